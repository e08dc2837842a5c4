"""TensorRT on an NVIDIA GPU: engines built from the shipped ONNX on the target GPU, cached.

Written against TensorRT 10 (the extras pin 10.8 or newer, below 11) and cuda-python 12.6.1 or
newer (``cuda.bindings.runtime``).  No GPU exists on the development machines or in CI:
tests/test_tensorrt_path.py drives this module through fake ``tensorrt`` and ``cuda.bindings``
modules that copy the real API surface, and benchmarks/gpu_smoke.py checks it on a real GPU.

* Nothing touches TensorRT before the checks that can refuse cleanly with
  :class:`BackendUnavailable` (``--backend auto`` then falls back to ONNX Runtime): a CUDA device,
  probed through the driver library (ctypes, ``libcuda.so.1``: creating a TensorRT Runtime or
  Builder without a device crashes the process); the driver's CUDA version against the CUDA
  major version of the installed TensorRT and cuda-python wheels (CUDA 12 wheels need driver
  r535 or newer, CUDA 13 wheels r580); TensorRT's version (11 removed the weakly typed FP16
  builds this module uses).
* ``cudaSetDevice`` selects the device before anything is built, deserialized or allocated,
  and again before every run: CUDA's current device belongs to the calling thread.
* One settings object per task (:func:`settings_for_task`) serves ``stemlive export engines``
  and runtime loads alike.  An export records what it built in a manifest beside the engine;
  runtime loads use the manifest's settings, so an exported engine (FP16, another batch limit)
  is the one a live run loads instead of building a new one after the detector is armed.
* An engine is specific to the ONNX file, the build settings, the TensorRT version, the CUDA
  major version (CUDA 12 and 13 builds share TensorRT version strings) and the GPU (name,
  compute capability); the cache key hashes all of them.  Engines are written atomically (a
  unique temporary file, removed on any error, then a rename); a cached engine that does not
  deserialize is rebuilt once.
* Inference: one float32 input and float32 outputs (checked at load); every input shape is
  checked against the engine's optimisation profile and ``set_input_shape``'s answer, so an
  input outside it raises instead of running on stale shapes; ``execute_async_v3`` on a CUDA
  stream, device buffers sized for the profile's largest input.  ``close()`` (or garbage
  collection) frees the buffers and destroys the stream.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import weakref
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..cards import sha256_of
from .base import Backend, BackendUnavailable

log = logging.getLogger(__name__)

_CU_ATTR_CC_MAJOR, _CU_ATTR_CC_MINOR = 75, 76  # CUdevice_attribute values
TENSORRT_SUPPORTED = ((10, 0), (11, 0))  # [from, to): the API used here is TensorRT 10's
# per CUDA major: the cuDriverGetVersion value (1000·major + 10·minor) a driver must report, the
# driver release that first did, and the extra that installs TensorRT and cuda-python for it
CUDA_MAJORS = {12: (12020, "r535", "stemlive[tensorrt]"), 13: (13000, "r580", "stemlive[tensorrt-cu13]")}
MANIFEST_SCHEMA = 1
INSTALL_HINT = ("pip install --extra-index-url https://pypi.nvidia.com 'stemlive[tensorrt]' (CUDA 12, driver r535+) "
                "or 'stemlive[tensorrt-cu13]' (CUDA 13, driver r580+)")


_LOGGERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _logger(trt):
    """One TensorRT logger per process: TensorRT warns when builders and runtimes get different ones."""
    if trt not in _LOGGERS:
        _LOGGERS[trt] = trt.Logger(trt.Logger.WARNING)
    return _LOGGERS[trt]


class CudaError(RuntimeError):
    """A CUDA runtime call failed."""


class EngineUnreadable(RuntimeError):
    """A serialized engine that TensorRT cannot deserialize (torn, foreign or stale)."""


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]
    index: int = 0
    driver_cuda: int = 0  # cuDriverGetVersion: the newest CUDA the driver runs, e.g. 12080 = 12.8


@dataclass(frozen=True)
class Platform:
    """What an engine depends on besides its model and build settings."""

    tensorrt: str
    cuda_major: int
    gpu: GpuInfo

    def key_fields(self) -> dict:
        return {"tensorrt": self.tensorrt, "cuda_major": self.cuda_major, "gpu": self.gpu.name,
                "compute_capability": list(self.gpu.compute_capability)}


@dataclass(frozen=True)
class EngineSettings:
    """Build settings that change the engine (all part of the cache key).

    The defaults serve the PACBED networks (fixed 64² input, batches of patterns);
    :func:`settings_for_task` gives the atom networks their image-size profile.  FP16 is off by
    default, so results match ONNX Runtime to FP32/TF32 rounding; ``stemlive export engines
    --fp16`` opts in and the manifest carries that choice to every later load."""

    fp16: bool = False
    min_batch: int = 1
    opt_batch: int = 64
    max_batch: int = 256
    workspace_mb: int = 1024
    # free image axes (the atom networks): smallest, typical and largest edge of the profile
    min_edge: int = 16
    opt_edge: int = 256
    max_edge: int = 1024

    def __post_init__(self):
        if not isinstance(self.fp16, bool):
            raise ValueError(f"fp16 must be true or false, got {self.fp16!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "fp16" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"batch profile {self.min_batch} ≤ {self.opt_batch} ≤ {self.max_batch} does not hold")
        if not self.min_edge <= self.opt_edge <= self.max_edge:
            raise ValueError(f"edge profile {self.min_edge} ≤ {self.opt_edge} ≤ {self.max_edge} does not hold")

    def with_max_batch(self, n: int) -> "EngineSettings":
        """These settings with batches up to ``n`` (the optimum and minimum follow when above it)."""
        return replace(self, max_batch=n, opt_batch=min(self.opt_batch, n), min_batch=min(self.min_batch, n))

    @classmethod
    def from_dict(cls, data: dict) -> "EngineSettings":
        """Settings from a manifest: exactly the fields, validated (a stale manifest is refused)."""
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            raise ValueError(f"engine settings must have exactly the fields {', '.join(sorted(names))}")
        return cls(**data)


def settings_for_task(task: str, base: EngineSettings | None = None) -> EngineSettings:
    """The engine settings for a model card's task: the one place both ``stemlive export engines``
    and runtime loads take them from, so their cache keys agree."""
    base = base or EngineSettings()
    if task.startswith("atoms-"):
        from ..atom_analysis import atom_engine_settings

        return atom_engine_settings(base)
    return base


def _profile_shape(item: tuple, edge: int) -> tuple:
    """A network input's shape (without the batch axis) with its free axes (-1) set to ``edge``."""
    return tuple(edge if d < 0 else d for d in item)


def _volume(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def cuda_version(value: int) -> str:
    """cuDriverGetVersion / cudaRuntimeGetVersion's integer as "major.minor" (12080 -> "12.8")."""
    return f"{value // 1000}.{value % 1000 // 10}"


# -- what is there: device, driver, wheels (nothing here imports TensorRT) ---------------------
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
    major, minor, driver = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    cu.cuDeviceGetAttribute(ctypes.byref(major), _CU_ATTR_CC_MAJOR, dev)
    cu.cuDeviceGetAttribute(ctypes.byref(minor), _CU_ATTR_CC_MINOR, dev)
    cu.cuDriverGetVersion(ctypes.byref(driver))
    return GpuInfo(name.value.decode(errors="replace"), (major.value, minor.value), index, driver.value)


def _require_device(index: int) -> GpuInfo:
    gpu = cuda_device(index)
    if gpu is None:
        raise BackendUnavailable(f"no CUDA device {index}: the tensorrt backend needs an NVIDIA GPU and driver")
    return gpu


def installed_tensorrt_cuda() -> int | None:
    """The CUDA major version the installed TensorRT wheels are built for (``tensorrt-cu12`` or
    ``-cu13``), from package metadata, without importing TensorRT; None when TensorRT did not
    come from those wheels (a container's system package, say) or is not installed."""
    from importlib import metadata

    found = set()
    for major in (11, 12, 13):
        for dist in (f"tensorrt-cu{major}", f"tensorrt-cu{major}-libs", f"tensorrt-cu{major}-bindings"):
            try:
                metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
            found.add(major)
    if len(found) > 1:
        raise BackendUnavailable(f"TensorRT wheels for CUDA {' and '.join(map(str, sorted(found)))} are installed "
                                 "together; uninstall all but one")
    return found.pop() if found else None


def check_driver(gpu: GpuInfo, cuda_major: int, what: str) -> None:
    """Refuse (BackendUnavailable) when ``what``, built for ``cuda_major``, cannot run on this driver."""
    if cuda_major not in CUDA_MAJORS:
        raise BackendUnavailable(f"{what} is built for CUDA {cuda_major}; the tensorrt backend supports CUDA 12 "
                                 f"({CUDA_MAJORS[12][2]}) and CUDA 13 ({CUDA_MAJORS[13][2]})")
    need, release, _ = CUDA_MAJORS[cuda_major]
    if gpu.driver_cuda < need:
        hint = f", or install {CUDA_MAJORS[12][2]} (CUDA 12, driver r535+)" if cuda_major > 12 else ""
        raise BackendUnavailable(
            f"the NVIDIA driver supports CUDA {cuda_version(gpu.driver_cuda)}, but {what} is built for CUDA "
            f"{cuda_major} and needs a driver for CUDA {cuda_version(need)} ({release} or newer): update the "
            f"driver{hint}")


def check_tensorrt_version(version: str) -> None:
    """Refuse a TensorRT outside :data:`TENSORRT_SUPPORTED` before anything calls into it."""
    try:
        parts = tuple(int(p) for p in str(version).split(".")[:2])
    except ValueError:
        raise BackendUnavailable(f"cannot read TensorRT's version {version!r}") from None
    lo, hi = TENSORRT_SUPPORTED
    if not lo <= parts < hi:
        raise BackendUnavailable(
            f"TensorRT {version} is not supported: the tensorrt backend is written for TensorRT 10 (TensorRT 11 "
            "removed the weakly typed FP16 builds it uses, BuilderFlag.FP16 and Builder.platform_has_fast_fp16); "
            f"{INSTALL_HINT}")


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(f"tensorrt is not installed; {INSTALL_HINT}") from exc
    check_tensorrt_version(trt.__version__)
    return trt


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as exc:
        raise BackendUnavailable(f"cuda-python >= 12.6.1 (cuda.bindings.runtime) is not installed; {INSTALL_HINT}") \
            from exc
    return cudart


def _cuda(cudart, result, what: str):
    """The value(s) of a cuda-python call, which returns ``(cudaError_t, *values)``; raises
    :class:`CudaError` naming the call and the error otherwise."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise CudaError(f"{what} failed: {_error_text(cudart, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _error_text(cudart, err) -> str:
    try:
        _, text = cudart.cudaGetErrorString(err)
        text = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
        return f"{getattr(err, 'name', err)} ({text})"
    except Exception:  # noqa: BLE001 -- the error itself is what matters
        return str(err)


class GpuRuntime:
    """TensorRT and the CUDA runtime on one device, after every check that can refuse cleanly."""

    def __init__(self, platform: Platform, trt, cudart, device: int):
        self.platform, self.trt, self.cudart, self.device = platform, trt, cudart, device

    def select_device(self) -> None:
        """Make this device current in the calling thread (CUDA keeps one per thread)."""
        _cuda(self.cudart, self.cudart.cudaSetDevice(self.device), f"cudaSetDevice({self.device})")


def open_runtime(device: int = 0) -> GpuRuntime:
    """Probe, check and import, in the order that never crashes: device (ctypes), driver against
    the TensorRT wheels' CUDA (metadata), cuda-python and its CUDA, ``cudaSetDevice``, and only
    then TensorRT (its version checked)."""
    gpu = _require_device(device)
    trt_cuda = installed_tensorrt_cuda()
    if trt_cuda is not None:
        check_driver(gpu, trt_cuda, f"the installed TensorRT (tensorrt-cu{trt_cuda})")
    cudart = _cudart()
    rt_cuda = _cuda(cudart, cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion") // 1000
    check_driver(gpu, rt_cuda, f"cuda-python (CUDA runtime {rt_cuda})")
    if trt_cuda is not None and trt_cuda != rt_cuda:
        raise BackendUnavailable(f"TensorRT is built for CUDA {trt_cuda} but cuda-python for CUDA {rt_cuda}: "
                                 f"install the matching pair ({CUDA_MAJORS[trt_cuda][2]})")
    GpuRuntime(None, None, cudart, device).select_device()  # TensorRT then works on this device
    trt = _import_tensorrt()
    return GpuRuntime(Platform(str(trt.__version__), trt_cuda or rt_cuda, gpu), trt, cudart, device)


# -- cache: keys, paths, manifest ------------------------------------------------------------
def _hash(doc: dict) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def engine_cache_key(onnx_sha256: str, settings: EngineSettings, platform: Platform) -> str:
    """Hash of everything an engine depends on."""
    return _hash({"onnx_sha256": onnx_sha256, "settings": asdict(settings), **platform.key_fields()})


def default_engine_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(os.environ.get("STEMLIVE_CACHE", user_cache_dir("stemlive"))) / "engines"


def engine_path(onnx_path: Path, settings: EngineSettings, platform: Platform, cache_dir: Path | None = None,
                onnx_sha256: str | None = None) -> Path:
    key = engine_cache_key(onnx_sha256 or sha256_of(onnx_path), settings, platform)
    return Path(cache_dir or default_engine_dir()) / f"{Path(onnx_path).stem}-{key}.engine"


def manifest_path(onnx_path: Path, platform: Platform, cache_dir: Path | None = None,
                  onnx_sha256: str | None = None) -> Path:
    """Where an export records the settings of this model's engine on this platform."""
    key = _hash({"onnx_sha256": onnx_sha256 or sha256_of(onnx_path), **platform.key_fields()})
    return Path(cache_dir or default_engine_dir()) / f"{Path(onnx_path).stem}-{key}.manifest.json"


def write_manifest(onnx_path: Path, settings: EngineSettings, platform: Platform, engine: Path,
                   cache_dir: Path | None = None) -> Path:
    """Record an exported engine's settings for later loads of the same model on this platform."""
    sha = sha256_of(onnx_path)
    doc = {"schema": MANIFEST_SCHEMA, "onnx_file": Path(onnx_path).name, "onnx_sha256": sha,
           "settings": asdict(settings), "engine": Path(engine).name, **platform.key_fields(),
           "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path = manifest_path(onnx_path, platform, cache_dir, sha)
    write_atomically(path, json.dumps(doc, indent=1).encode())
    return path


def read_manifest(onnx_path: Path, platform: Platform, cache_dir: Path | None = None,
                  onnx_sha256: str | None = None) -> EngineSettings | None:
    """The exported settings for this model and platform, or None (none exported, or a manifest
    that does not parse or does not describe this model: ignored with a warning)."""
    sha = onnx_sha256 or sha256_of(onnx_path)
    path = manifest_path(onnx_path, platform, cache_dir, sha)
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
        if doc.get("schema") != MANIFEST_SCHEMA:
            raise ValueError(f"schema {doc.get('schema')!r}, expected {MANIFEST_SCHEMA}")
        if doc.get("onnx_sha256") != sha or any(doc.get(k) != v for k, v in platform.key_fields().items()):
            raise ValueError("it describes another model or platform")
        return EngineSettings.from_dict(doc.get("settings"))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("ignoring engine manifest %s (%s)", path, exc)
        return None


def resolve_settings(onnx_path: Path, platform: Platform, requested: EngineSettings | None,
                     cache_dir: Path | None = None, use_manifest: bool = True,
                     onnx_sha256: str | None = None) -> EngineSettings:
    """What a load builds or finds: the exported settings when a manifest has them, else the
    caller's, else the defaults."""
    exported = read_manifest(onnx_path, platform, cache_dir, onnx_sha256) if use_manifest else None
    if exported is not None:
        if requested is not None and exported != requested:
            log.info("%s: using the exported engine settings %s", Path(onnx_path).name, exported)
        return exported
    return requested or EngineSettings()


def write_atomically(out: Path, data) -> Path:
    """Write ``data`` (bytes or a buffer, e.g. TensorRT's IHostMemory) to ``out`` through a unique
    temporary file in the same folder and a rename: concurrent writers, threads or processes,
    never see a torn file, and an error leaves no temporary file behind."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out


# -- build -------------------------------------------------------------------------------------
def _enable_fp16(trt, config) -> None:
    """FP16 kernels allowed (weak typing, TensorRT 10).  Every GPU TensorRT 10 supports has fast
    FP16, so the deprecated ``platform_has_fast_fp16`` is not asked."""
    flag = getattr(trt.BuilderFlag, "FP16", None)
    if flag is None:
        raise BackendUnavailable(f"TensorRT {trt.__version__} has no BuilderFlag.FP16 (removed in TensorRT 11); "
                                 "build without --fp16 or install TensorRT 10")
    config.set_flag(flag)


def build_engine(onnx_path: Path, settings: EngineSettings, out: Path, trt=None) -> Path:
    """Build a serialized engine from ``onnx_path`` on the current CUDA device; write it atomically."""
    trt = trt or _import_tensorrt()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    if network.num_inputs != 1:
        raise RuntimeError(f"{onnx_path}: {network.num_inputs} inputs; stemlive's networks have one")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    if settings.fp16:
        _enable_fp16(trt, config)
    profile = builder.create_optimization_profile()
    inp = network.get_input(0)
    item = tuple(inp.shape)[1:]
    profile.set_shape(inp.name, (settings.min_batch,) + _profile_shape(item, settings.min_edge),
                      (settings.opt_batch,) + _profile_shape(item, settings.opt_edge),
                      (settings.max_batch,) + _profile_shape(item, settings.max_edge))
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (its log above says why)")
    return write_atomically(out, blob)


def ensure_engine(onnx_path: Path, settings: EngineSettings, cache_dir: Path | None = None, device: int = 0, *,
                  runtime: GpuRuntime | None = None, onnx_sha256: str | None = None) -> tuple[Path, bool]:
    """The cached engine for this model, settings, TensorRT, CUDA and GPU, built if missing.

    Returns (path, built_now).  Raises BackendUnavailable, without importing TensorRT, when no
    CUDA device is present or the driver cannot run the installed wheels."""
    rt = runtime or open_runtime(device)  # before anything imports TensorRT
    eng = engine_path(Path(onnx_path), settings, rt.platform, cache_dir, onnx_sha256)
    if eng.exists():
        return eng, False
    rt.select_device()
    log.info("building TensorRT engine for %s on %s (once per GPU)", Path(onnx_path).name, rt.platform.gpu.name)
    t0 = time.perf_counter()
    build_engine(Path(onnx_path), settings, eng, rt.trt)
    log.info("built %s in %.1f s", eng.name, time.perf_counter() - t0)
    return eng, True


def _deserialize(rt: GpuRuntime, engine_file: Path):
    """(TensorRT Runtime, ICudaEngine) of ``engine_file`` on the runtime's device."""
    rt.select_device()
    runtime = rt.trt.Runtime(_logger(rt.trt))
    try:
        engine = runtime.deserialize_cuda_engine(engine_file.read_bytes())
    except Exception as exc:  # noqa: BLE001 -- TensorRT answers None or raises, depending on the fault
        raise EngineUnreadable(f"TensorRT could not deserialize {engine_file}: {exc}") from exc
    if engine is None:
        raise EngineUnreadable(f"TensorRT could not deserialize {engine_file}")
    return runtime, engine


def _check_float32(trt, engine, names: list[str], engine_file: Path) -> None:
    """Every I/O tensor float32: what the callers feed and what the buffers are sized for."""
    other = {n: engine.get_tensor_dtype(n) for n in names if engine.get_tensor_dtype(n) != trt.DataType.FLOAT}
    if other:
        listed = ", ".join(f"{n}: {getattr(d, 'name', d)}" for n, d in other.items())
        raise RuntimeError(f"{engine_file.name}: input/output tensors must be float32 ({listed})")


def export_engine(onnx_path: Path, settings: EngineSettings, cache_dir: Path | None = None,
                  device: int = 0) -> tuple[Path, bool]:
    """Build (or find) the engine with exactly ``settings``, prove that it loads, and record the
    settings in the manifest that later loads of this model on this platform read."""
    backend = TensorRTBackend.load(onnx_path, settings, cache_dir=cache_dir, device=device, use_manifest=False)
    try:
        write_manifest(Path(onnx_path), backend.settings, backend.platform, backend.engine_file, cache_dir)
    finally:
        backend.close()
    return backend.engine_file, backend.built_now


# -- inference ---------------------------------------------------------------------------------
class _DeviceResources:
    """A backend's stream and buffers, apart from the backend so a finalizer can free them."""

    def __init__(self, cudart, device: int):
        self.cudart, self.device = cudart, device
        self.stream = None
        self.buffers: dict[str, int] = {}

    def release(self) -> None:
        """Free every buffer and destroy the stream; errors are logged (this runs in finalizers)."""
        cudart = self.cudart
        calls = [(cudart.cudaSetDevice, (self.device,), "cudaSetDevice")]
        if self.stream is not None:
            calls.append((cudart.cudaStreamSynchronize, (self.stream,), "cudaStreamSynchronize"))
        calls += [(cudart.cudaFree, (ptr,), "cudaFree") for ptr in self.buffers.values()]
        if self.stream is not None:
            calls.append((cudart.cudaStreamDestroy, (self.stream,), "cudaStreamDestroy"))
        self.buffers, self.stream = {}, None
        for fn, args, what in calls:
            try:
                _cuda(cudart, fn(*args), what)
            except Exception as exc:  # noqa: BLE001
                log.warning("releasing TensorRT buffers: %s", exc)


class TensorRTBackend(Backend):
    name = "tensorrt"

    @classmethod
    def load(cls, path: str | Path, settings: EngineSettings | None = None, cache_dir: Path | None = None,
             device: int = 0, use_manifest: bool = True, **options) -> "TensorRTBackend":
        """The engine of ``path``, built if missing.  ``settings``: what to build when no export
        recorded settings for this model (the manifest wins unless ``use_manifest`` is False)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"model file {path} does not exist")
        rt = open_runtime(device)
        sha = sha256_of(path)
        settings = resolve_settings(path, rt.platform, settings, cache_dir, use_manifest, sha)
        eng, built = ensure_engine(path, settings, cache_dir, device, runtime=rt, onnx_sha256=sha)
        try:
            trt_runtime, engine = _deserialize(rt, eng)
        except EngineUnreadable as exc:
            if built:
                raise
            log.warning("%s; rebuilding it once", exc)
            eng.unlink(missing_ok=True)
            eng, built = ensure_engine(path, settings, cache_dir, device, runtime=rt, onnx_sha256=sha)
            trt_runtime, engine = _deserialize(rt, eng)
        return cls(path, eng, settings, rt, trt_runtime, engine, built)

    def __init__(self, onnx_path: Path, engine_file: Path, settings: EngineSettings, rt: GpuRuntime, trt_runtime,
                 engine, built_now: bool = False):
        trt = rt.trt
        self.rt, self.platform, self.settings = rt, rt.platform, settings
        self.engine_file, self.built_now = Path(engine_file), built_now
        self._trt_runtime, self.engine = trt_runtime, engine  # the Runtime outlives its engine
        self._lock = threading.Lock()  # one execution context: one run at a time
        self._closed = False
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1:
            raise RuntimeError(f"{self.engine_file.name}: {len(inputs)} inputs; stemlive's networks have one")
        _check_float32(trt, engine, names, self.engine_file)
        item = tuple(engine.get_tensor_shape(inputs[0]))[1:]
        super().__init__(onnx_path, inputs[0], tuple(None if d < 0 else d for d in item), outputs)
        self.profile = tuple(tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(inputs[0], 0))
        self.context = engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"{self.engine_file.name}: TensorRT could not create an execution context")
        self._res = _DeviceResources(rt.cudart, rt.device)
        self._release = weakref.finalize(self, self._res.release)  # also when never closed
        cudart = rt.cudart
        self._res.stream = _cuda(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        for name, nbytes in self._buffer_sizes().items():
            self._res.buffers[name] = _cuda(cudart, cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes}) for {name}")

    def _buffer_sizes(self) -> dict[str, int]:
        """Bytes per I/O tensor at the profile's largest input (float32, checked at load)."""
        largest = self.profile[2]
        self._set_shape(largest)
        sizes = {self.input_name: _volume(largest) * 4}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{self.engine_file.name}: output {name} has no shape for input {largest}")
            sizes[name] = _volume(shape) * 4
        return sizes

    def _set_shape(self, shape: tuple) -> None:
        """Set the input shape, refusing one outside the optimisation profile: TensorRT's
        ``set_input_shape`` answers False then, and the engine would run on the previous shape."""
        lo, _, hi = self.profile
        shape = tuple(int(d) for d in shape)
        where = f"{self.path.name}: input shape {shape} is outside the TensorRT engine's optimisation profile " \
                f"{lo} to {hi}"
        if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
            raise ValueError(where)
        if not self.context.set_input_shape(self.input_name, shape):
            raise ValueError(f"{where} (TensorRT refused it)")

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        largest = self.profile[2][0]
        if batch.shape[0] > largest:
            parts = [self.run(batch[i:i + largest]) for i in range(0, batch.shape[0], largest)]
            return {k: np.concatenate([p[k] for p in parts]) for k in self.output_names}
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.path.name}: the TensorRT backend was closed")
            return self._run_locked(batch)

    def _run_locked(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        cudart, res = self.rt.cudart, self._res
        self.rt.select_device()  # this thread's current device may be another
        self._set_shape(batch.shape)
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _cuda(cudart, cudart.cudaMemcpyAsync(res.buffers[self.input_name], batch.ctypes.data, batch.nbytes, h2d,
                                             res.stream), "cudaMemcpyAsync (input)")
        for name, ptr in res.buffers.items():
            if not self.context.set_tensor_address(name, int(ptr)):
                raise RuntimeError(f"{self.path.name}: TensorRT refused the address of {name}")
        if not self.context.execute_async_v3(res.stream):
            raise RuntimeError(f"TensorRT execution failed for {self.path.name}")
        out = {}
        for name in self.output_names:
            arr = np.empty(tuple(self.context.get_tensor_shape(name)), np.float32)
            _cuda(cudart, cudart.cudaMemcpyAsync(arr.ctypes.data, res.buffers[name], arr.nbytes, d2h, res.stream),
                  f"cudaMemcpyAsync ({name})")
            out[name] = arr
        _cuda(cudart, cudart.cudaStreamSynchronize(res.stream), "cudaStreamSynchronize")
        return out

    def close(self) -> None:
        """Free the device buffers and the stream, then drop the TensorRT objects (idempotent)."""
        with self._lock:
            self._closed = True
            self._release()
            self.context = self.engine = self._trt_runtime = None
