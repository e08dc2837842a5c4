"""Inference backends behind one interface (``load(path)``, ``__call__(batch)``).

``load_backend(path, "auto")`` uses TensorRT when a CUDA device and TensorRT are present and
ONNX Runtime on the CPU otherwise.  "auto" falls back on *any* failure to load the GPU path (no
device, package missing, unsupported TensorRT, CUDA/driver mismatch, parse or build error, an
engine that will not deserialize): a live run must not abort because an optional accelerator
did not come up.  The fallback is logged as a warning that names the reason.  ``"tensorrt"``
asked for explicitly raises instead.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .base import Backend, BackendUnavailable
from .onnxruntime import OnnxRuntimeBackend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt")


def load_backend(path: str | Path, prefer: str = "auto", **options) -> Backend:
    """The model at ``path`` behind ``prefer`` ("auto": TensorRT if it comes up, else ONNX Runtime).

    ``options``: ``threads`` (ONNX Runtime), ``settings``, ``cache_dir``, ``device`` (TensorRT)."""
    if prefer not in BACKENDS:
        raise ValueError(f"unknown backend {prefer!r}; choose one of {', '.join(BACKENDS)}")
    if not Path(path).exists():  # not a GPU problem: no fallback warning for it
        raise FileNotFoundError(f"model file {path} does not exist")
    if prefer in ("auto", "tensorrt"):
        from .tensorrt import TensorRTBackend

        try:
            return TensorRTBackend.load(path, **options)
        except Exception as exc:  # noqa: BLE001 -- see the module docstring
            if prefer == "tensorrt":
                raise
            log.warning("GPU inference not available for %s (%s); using onnxruntime on the CPU",
                        Path(path).name, _reason(exc))
            log.debug("TensorRT load failure", exc_info=True)
    return OnnxRuntimeBackend.load(path, **{k: v for k, v in options.items() if k == "threads"})


def _reason(exc: BaseException) -> str:
    """The exception's message, with its type unless it is the expected "not available here"."""
    return str(exc) if isinstance(exc, BackendUnavailable) else f"{type(exc).__name__}: {exc}"


__all__ = ["Backend", "BackendUnavailable", "OnnxRuntimeBackend", "load_backend"]
