"""Inference backends behind one interface (``load(path)``, ``__call__(batch)``).

``load_backend(path, "auto")`` uses TensorRT when a CUDA device and TensorRT are present and
ONNX Runtime on the CPU otherwise; the fallback is logged as a warning that names the reason.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .base import Backend, BackendUnavailable
from .onnxruntime import OnnxRuntimeBackend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt")


def load_backend(path: str | Path, prefer: str = "auto", **options) -> Backend:
    if prefer not in BACKENDS:
        raise ValueError(f"unknown backend {prefer!r}; choose one of {', '.join(BACKENDS)}")
    if prefer in ("auto", "tensorrt"):
        from .tensorrt import TensorRTBackend

        try:
            return TensorRTBackend.load(path, **options)
        except BackendUnavailable as exc:
            if prefer == "tensorrt":
                raise
            log.warning("GPU inference not available (%s); using onnxruntime on the CPU", exc)
    return OnnxRuntimeBackend.load(path, **{k: v for k, v in options.items() if k == "threads"})


__all__ = ["Backend", "BackendUnavailable", "OnnxRuntimeBackend", "load_backend"]
