"""The one interface every inference runtime implements: ``load(path)`` and ``__call__(batch)``."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np


class BackendUnavailable(RuntimeError):
    """The runtime cannot run here (no GPU, package missing); the caller may fall back."""


class Backend(ABC):
    """An ONNX model behind a runtime.

    Input: one float32 array (N, C, H, W), N free (dynamic batch), H and W fixed or free (None:
    the atom networks take any image size their card allows); the model card says how it is
    normalised.  Output: a dict from the ONNX output names to float32 arrays with leading N.
    """

    name: str = "base"

    def __init__(self, path: Path, input_name: str, input_shape: tuple[int, ...], output_names: list[str]):
        self.path = Path(path)
        self.input_name = input_name
        self.input_shape = tuple(input_shape)  # without the batch axis; None = any size
        self.output_names = list(output_names)

    @classmethod
    @abstractmethod
    def load(cls, path: str | Path, **options) -> "Backend":
        """Open the model at ``path`` (an .onnx file)."""

    @abstractmethod
    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run a validated batch."""

    def metadata(self) -> dict[str, str]:
        """The ONNX file's ``metadata_props`` (card id and input contract), read from the file this
        backend was loaded from, so the model-card check runs whatever the runtime (a TensorRT
        engine carries no ONNX metadata)."""
        from ..cards import onnx_metadata

        return onnx_metadata(self.path)

    def close(self) -> None:
        """Release what the runtime holds outside Python's memory (device buffers, streams); the
        backend cannot run afterwards.  Nothing to release by default."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = np.asarray(batch)
        if batch.ndim != len(self.input_shape) + 1 or any(
                want is not None and got != want for got, want in zip(batch.shape[1:], self.input_shape)):
            dims = ", ".join("any" if d is None else str(d) for d in self.input_shape)
            raise ValueError(f"{self.path.name}: input must be (N, {dims}), got {batch.shape}")
        if not np.all(np.isfinite(batch)):
            raise ValueError(f"{self.path.name}: input contains NaN or infinity")
        return self.run(np.ascontiguousarray(batch, dtype=np.float32))
