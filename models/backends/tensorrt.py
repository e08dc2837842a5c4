"""TensorRT on an NVIDIA GPU: engines built from the shipped ONNX on the target GPU, cached.

Not run on the development machines or in CI (no GPU there): the device probe, cache keys,
engine paths and the clean refusal are tested; building and executing engines is not.

* The CUDA device is probed through the driver library (ctypes, ``libcuda.so.1``) *before*
  TensorRT is imported: creating a TensorRT Runtime or Builder without a device crashes the
  process, so without a device we refuse with :class:`BackendUnavailable` and never touch it.
* An engine is specific to the ONNX file, the build settings, the TensorRT version and the GPU
  (name and compute capability); the cache key hashes all of them, and engines are written
  atomically (temporary file, then rename) so concurrent builders never leave a torn file.
* Inference uses ``execute_async_v3`` on a CUDA stream with device buffers sized for the
  optimisation profile's largest batch (cuda-python for allocation and copies).
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..cards import sha256_of
from .base import Backend, BackendUnavailable

log = logging.getLogger(__name__)

_CU_ATTR_CC_MAJOR, _CU_ATTR_CC_MINOR = 75, 76  # CUdevice_attribute values


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]
    index: int = 0


@dataclass(frozen=True)
class EngineSettings:
    """Build settings that change the engine (all part of the cache key)."""

    fp16: bool = True
    min_batch: int = 1
    opt_batch: int = 64
    max_batch: int = 256
    workspace_mb: int = 1024
    # free image axes (the atom networks): smallest, typical and largest edge of the profile
    min_edge: int = 16
    opt_edge: int = 256
    max_edge: int = 1024


def _profile_shape(item: tuple, edge: int) -> tuple:
    """A network input's shape (without the batch axis) with its free axes (-1) set to ``edge``."""
    return tuple(edge if d < 0 else d for d in item)


def cuda_device(index: int = 0, libname: str = "libcuda.so.1") -> GpuInfo | None:
    """The CUDA device ``index`` through the driver API, or None when there is none (no TensorRT)."""
    try:
        cu = ctypes.CDLL(libname)
    except OSError:
        return None
    if cu.cuInit(0) != 0:
        return None
    count = ctypes.c_int(0)
    if cu.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= index:
        return None
    dev = ctypes.c_int(0)
    if cu.cuDeviceGet(ctypes.byref(dev), index) != 0:
        return None
    name = ctypes.create_string_buffer(256)
    cu.cuDeviceGetName(name, 256, dev)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    cu.cuDeviceGetAttribute(ctypes.byref(major), _CU_ATTR_CC_MAJOR, dev)
    cu.cuDeviceGetAttribute(ctypes.byref(minor), _CU_ATTR_CC_MINOR, dev)
    return GpuInfo(name.value.decode(errors="replace"), (major.value, minor.value), index)


def engine_cache_key(onnx_sha256: str, settings: EngineSettings, trt_version: str, gpu: GpuInfo) -> str:
    """Hash of everything an engine depends on."""
    blob = json.dumps({
        "onnx_sha256": onnx_sha256, "settings": asdict(settings), "tensorrt": trt_version,
        "gpu": gpu.name, "compute_capability": list(gpu.compute_capability),
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def default_engine_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(os.environ.get("STEMLIVE_CACHE", user_cache_dir("stemlive"))) / "engines"


def engine_path(onnx_path: Path, settings: EngineSettings, trt_version: str, gpu: GpuInfo,
                cache_dir: Path | None = None) -> Path:
    key = engine_cache_key(sha256_of(onnx_path), settings, trt_version, gpu)
    return Path(cache_dir or default_engine_dir()) / f"{Path(onnx_path).stem}-{key}.engine"


def _require_device(index: int) -> GpuInfo:
    gpu = cuda_device(index)
    if gpu is None:
        raise BackendUnavailable(f"no CUDA device {index}: the tensorrt backend needs an NVIDIA GPU and driver")
    return gpu


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(
            "tensorrt is not installed; pip install --extra-index-url https://pypi.nvidia.com 'stemlive[tensorrt]'"
        ) from exc
    return trt


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as exc:
            raise BackendUnavailable("cuda-python is not installed (pip install 'stemlive[tensorrt]')") from exc
    return cudart


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA runtime error {err}")
    return rest[0] if len(rest) == 1 else rest


def build_engine(onnx_path: Path, settings: EngineSettings, out: Path, trt=None) -> Path:
    """Build a serialized engine from ``onnx_path`` on the current GPU and write it atomically."""
    trt = trt or _import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    if settings.fp16 and builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    inp = network.get_input(0)
    item = tuple(inp.shape)[1:]
    profile.set_shape(inp.name, (settings.min_batch,) + _profile_shape(item, settings.min_edge),
                      (settings.opt_batch,) + _profile_shape(item, settings.opt_edge),
                      (settings.max_batch,) + _profile_shape(item, settings.max_edge))
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(bytes(blob))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return out


def ensure_engine(onnx_path: Path, settings: EngineSettings, cache_dir: Path | None = None,
                  device: int = 0) -> tuple[Path, bool]:
    """The cached engine for this model, settings, TensorRT and GPU, built if missing.

    Returns (path, built_now).  Raises BackendUnavailable, without importing TensorRT, when no
    CUDA device is present (`stemlive export engines` and the backend both come through here)."""
    gpu = _require_device(device)  # before anything imports TensorRT
    trt = _import_tensorrt()
    eng = engine_path(Path(onnx_path), settings, trt.__version__, gpu, cache_dir)
    if eng.exists():
        return eng, False
    log.info("building TensorRT engine for %s on %s (once per GPU)", Path(onnx_path).name, gpu.name)
    return build_engine(Path(onnx_path), settings, eng, trt), True


class TensorRTBackend(Backend):
    name = "tensorrt"

    @classmethod
    def load(cls, path: str | Path, settings: EngineSettings | None = None, cache_dir: Path | None = None,
             device: int = 0, **options) -> "TensorRTBackend":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"model file {path} does not exist")
        settings = settings or EngineSettings()
        eng, _ = ensure_engine(path, settings, cache_dir, device)
        return cls(path, eng, settings, _import_tensorrt(), _cudart())

    def __init__(self, onnx_path: Path, engine_file: Path, settings: EngineSettings, trt, cudart):
        self.trt, self.cudart, self.settings, self.engine_file = trt, cudart, settings, engine_file
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine_file.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"could not deserialize {engine_file}; delete it to rebuild")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        shape = tuple(self.engine.get_tensor_shape(inputs[0]))[1:]
        super().__init__(onnx_path, inputs[0], tuple(None if d < 0 else d for d in shape), outputs)
        shape = _profile_shape(shape, settings.max_edge)  # buffers hold the largest input
        self.stream = _check(cudart.cudaStreamCreate())
        self._buffers: dict[str, int] = {}
        for name in names:
            item = _profile_shape(tuple(self.engine.get_tensor_shape(name))[1:], settings.max_edge)
            if name in outputs:
                self.context.set_input_shape(inputs[0], (settings.max_batch,) + shape)
                item = tuple(self.context.get_tensor_shape(name))[1:]
            nbytes = settings.max_batch * int(np.prod(item)) * 4
            self._buffers[name] = _check(cudart.cudaMalloc(nbytes))

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        cudart, n = self.cudart, batch.shape[0]
        if n > self.settings.max_batch:
            parts = [self.run(batch[i:i + self.settings.max_batch]) for i in range(0, n, self.settings.max_batch)]
            return {k: np.concatenate([p[k] for p in parts]) for k in self.output_names}
        if n < self.settings.min_batch:
            raise ValueError(f"batch {n} is outside the TensorRT optimization profile "
                             f"[{self.settings.min_batch}, {self.settings.max_batch}]")
        self.context.set_input_shape(self.input_name, batch.shape)
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(cudart.cudaMemcpyAsync(self._buffers[self.input_name], batch.ctypes.data, batch.nbytes, h2d,
                                      self.stream))
        for name, ptr in self._buffers.items():
            self.context.set_tensor_address(name, int(ptr))
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError(f"TensorRT execution failed for {self.path.name}")
        out = {}
        for name in self.output_names:
            arr = np.empty(tuple(self.context.get_tensor_shape(name)), np.float32)
            _check(cudart.cudaMemcpyAsync(arr.ctypes.data, self._buffers[name], arr.nbytes, d2h, self.stream))
            out[name] = arr
        _check(cudart.cudaStreamSynchronize(self.stream))
        return out

    def close(self) -> None:
        for ptr in self._buffers.values():
            self.cudart.cudaFree(ptr)
        self._buffers.clear()
