"""The TensorRT path on a CPU, through fake ``tensorrt`` and ``cuda.bindings.runtime`` modules.

No GPU exists where these tests run, and TensorRT cannot be installed here.  The fakes copy the
API surface the backend uses -- TensorRT 10's Python API (Builder, OnnxParser, BuilderConfig,
IOptimizationProfile, Runtime, ICudaEngine, IExecutionContext) and cuda-python's runtime module
(calls return ``(cudaError_t, *values)``) -- and the behaviour that matters for correctness:

* TensorRT 11 lacks ``Builder.platform_has_fast_fp16`` and ``BuilderFlag.FP16``;
* ``set_input_shape`` answers False outside the optimisation profile and keeps the previous
  shape, so a caller that ignores the answer runs on stale shapes;
* a Builder records the thread's current CUDA device, an engine runs only with its own device
  current, and deserialization refuses foreign or torn data (returns None);
* device memory is real host memory behind fake pointers, so every copy and buffer size is
  exercised; an engine's "kernels" are ONNX Runtime on the embedded ONNX (FP16 engines round
  through float16), so results can be compared with ONNX Runtime itself.
"""
from __future__ import annotations

import ctypes
import enum
import gc
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import tomllib
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from stemlive.models import cards
from stemlive.models.backends import BackendUnavailable, OnnxRuntimeBackend, load_backend
from stemlive.models.backends import tensorrt as trt_backend
from stemlive.models.cards import SHIPPED_DIR, find_cards

from .test_backends_cards import write_tiny_card

ROOT = Path(__file__).resolve().parent.parent
MAGIC = b"FAKE-TRT-ENGINE\n"


class FakeCrash(BaseException):
    """What the real TensorRT does without a CUDA device: the process dies (not an Exception,
    so no fallback can hide it)."""


# -- fake cuda.bindings.runtime ----------------------------------------------------------------
class cudaError_t(enum.IntEnum):  # noqa: N801 -- cuda-python's names
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStream_t:  # noqa: N801
    def __init__(self, handle: int):
        self._handle = handle

    def __int__(self):
        return self._handle

    def getPtr(self):  # noqa: N802
        return self._handle


class FakeCuda:
    """Devices, the current device of each thread, allocations and streams."""

    def __init__(self, devices: list[trt_backend.GpuInfo], runtime_version: int = 12080):
        self.devices = devices
        self.runtime_version = runtime_version
        self.local = threading.local()
        self.memory: dict[int, tuple[int, bytearray]] = {}
        self.streams: dict[int, int] = {}
        self.next_ptr = 0x7F0000000000
        self.calls: list[tuple[str, int]] = []

    def current(self) -> int:
        return getattr(self.local, "device", 0)

    def module(self) -> types.ModuleType:
        m = types.ModuleType("cuda.bindings.runtime")
        m.cudaError_t, m.cudaMemcpyKind, m.cudaStream_t = cudaError_t, cudaMemcpyKind, cudaStream_t
        ok = cudaError_t.cudaSuccess

        def log(name):
            self.calls.append((name, self.current()))

        def cudaRuntimeGetVersion():  # noqa: N802
            return ok, self.runtime_version

        def cudaSetDevice(device):  # noqa: N802
            log("cudaSetDevice")
            if not 0 <= device < len(self.devices):
                return (cudaError_t.cudaErrorInvalidDevice,)
            self.local.device = device
            return (ok,)

        def cudaGetDevice():  # noqa: N802
            return ok, self.current()

        def cudaStreamCreate():  # noqa: N802
            log("cudaStreamCreate")
            handle = self.next_ptr
            self.next_ptr += 0x100
            self.streams[handle] = self.current()
            return ok, cudaStream_t(handle)

        def cudaStreamDestroy(stream):  # noqa: N802
            log("cudaStreamDestroy")
            if self.streams.pop(int(stream), None) is None:
                return (cudaError_t.cudaErrorInvalidResourceHandle,)
            return (ok,)

        def cudaStreamSynchronize(stream):  # noqa: N802
            return (ok,) if int(stream) in self.streams else (cudaError_t.cudaErrorInvalidResourceHandle,)

        def cudaMalloc(size):  # noqa: N802
            log("cudaMalloc")
            ptr = self.next_ptr
            self.next_ptr += (int(size) + 0xFFF) & ~0xFFF
            self.memory[ptr] = (self.current(), bytearray(int(size)))
            return ok, ptr

        def cudaFree(ptr):  # noqa: N802
            log("cudaFree")
            if self.memory.pop(int(ptr), None) is None:
                return (cudaError_t.cudaErrorInvalidValue,)
            return (ok,)

        def cudaMemcpyAsync(dst, src, count, kind, stream):  # noqa: N802
            if int(stream) not in self.streams or not isinstance(kind, cudaMemcpyKind):
                return (cudaError_t.cudaErrorInvalidResourceHandle,)
            if kind == cudaMemcpyKind.cudaMemcpyHostToDevice and dst in self.memory:
                buf = self.memory[dst][1]
                if count > len(buf):
                    return (cudaError_t.cudaErrorInvalidValue,)
                buf[:count] = ctypes.string_at(src, count)
                return (ok,)
            if kind == cudaMemcpyKind.cudaMemcpyDeviceToHost and src in self.memory:
                buf = self.memory[src][1]
                if count > len(buf):
                    return (cudaError_t.cudaErrorInvalidValue,)
                ctypes.memmove(dst, bytes(buf[:count]), count)
                return (ok,)
            return (cudaError_t.cudaErrorInvalidValue,)

        def cudaGetErrorString(err):  # noqa: N802
            return ok, f"fake CUDA error {int(err)}".encode()

        for fn in (cudaRuntimeGetVersion, cudaSetDevice, cudaGetDevice, cudaStreamCreate, cudaStreamDestroy,
                   cudaStreamSynchronize, cudaMalloc, cudaFree, cudaMemcpyAsync, cudaGetErrorString):
            setattr(m, fn.__name__, fn)
        return m


# -- fake tensorrt ---------------------------------------------------------------------------
class FakeTrtState:
    def __init__(self):
        self.builders: list[int] = []  # the current device of each Builder created
        self.builds = 0
        self.deserialized = 0
        self.fail_build = False
        self.half_outputs = False  # engines whose outputs are FP16 (not what stemlive builds)
        self.refuse_deserialize = False
        self.events: list[str] = []


def _onnx_io(data: bytes):
    """(input, outputs) of an ONNX graph as (name, dims) with symbolic dims as strings."""
    import onnxruntime as ort

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    spec = [(t.name, tuple(d if isinstance(d, int) else str(d) for d in t.shape)) for t in sess.get_inputs()]
    return spec, [(t.name, tuple(d if isinstance(d, int) else str(d) for d in t.shape)) for t in sess.get_outputs()], sess


def make_tensorrt(cuda: FakeCuda, state: FakeTrtState, version: str) -> types.ModuleType:
    """A ``tensorrt`` module with the API the backend uses; TensorRT 11 without the weak typing."""
    major = int(version.split(".")[0])
    t = types.ModuleType("tensorrt")
    t.__version__ = version

    class Severity(enum.IntEnum):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = Severity

        def __init__(self, min_severity=Severity.WARNING):
            self.min_severity = min_severity

    Logger.Severity = Severity
    t.Logger = Logger
    t.BuilderFlag = enum.IntEnum("BuilderFlag", {"FP16": 0, "INT8": 1, "TF32": 7} if major < 11 else {"TF32": 7})
    t.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
    t.TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    t.DataType = enum.IntEnum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3})

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape, self.dtype = name, tuple(shape), t.DataType.FLOAT

    class Network:
        def __init__(self):
            self.onnx, self.inputs, self.outputs = None, [], []

        @property
        def num_inputs(self):
            return len(self.inputs)

        @property
        def num_outputs(self):
            return len(self.outputs)

        def get_input(self, i):
            return self.inputs[i]

        def get_output(self, i):
            return self.outputs[i]

    class ParserError:
        def __init__(self, desc):
            self._desc = desc

        def desc(self):
            return self._desc

        def __str__(self):
            return f"In node -1: {self._desc}"

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        def parse(self, model: bytes) -> bool:
            try:
                (inp, *more), outs, _ = _onnx_io(bytes(model))
            except Exception as exc:  # noqa: BLE001
                self.errors = [ParserError(str(exc).splitlines()[0])]
                return False
            self.network.onnx = bytes(model)
            self.network.inputs = [Tensor(n, [d if isinstance(d, int) else -1 for d in s]) for n, s in [inp, *more]]
            self.network.outputs = [Tensor(n, [d if isinstance(d, int) else -1 for d in s]) for n, s in outs]
            return True

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class OptimizationProfile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, min, opt, max):  # noqa: A002 -- TensorRT's keyword names
            self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

    class BuilderConfig:
        def __init__(self):
            self.flags, self.pools, self.profiles = set(), {}, []

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = int(size)

        def set_flag(self, flag):
            self.flags.add(flag)

        def get_flag(self, flag):
            return flag in self.flags

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger):
            if not cuda.devices:
                raise FakeCrash("TensorRT Builder created without a CUDA device")
            self.device = cuda.current()
            state.builders.append(self.device)

        def create_network(self, flags=0):
            return Network()

        def create_builder_config(self):
            return BuilderConfig()

        def create_optimization_profile(self):
            return OptimizationProfile()

        def build_serialized_network(self, network, config):
            state.builds += 1
            inp = network.get_input(0)
            if state.fail_build or not config.profiles or inp.name not in config.profiles[0].shapes:
                return None
            lo, opt, hi = config.profiles[0].shapes[inp.name]
            fixed_ok = all(d < 0 or a == d == b for d, a, b in zip(inp.shape, lo, hi))
            if not (len(lo) == len(inp.shape) and fixed_ok and all(a <= o <= b for a, o, b in zip(lo, opt, hi))):
                return None
            fp16 = "FP16" in t.BuilderFlag.__members__ and t.BuilderFlag.FP16 in config.flags
            header = {"tensorrt": version, "device": self.device, "cc": list(cuda.devices[self.device].compute_capability),
                      "fp16": fp16, "profile": [lo, opt, hi], "half_outputs": state.half_outputs}
            return MAGIC + json.dumps(header).encode() + b"\n" + network.onnx

    if major < 11:
        class Builder10(Builder):
            @property
            def platform_has_fast_fp16(self):  # deprecated in 10, removed in 11
                state.events.append("platform_has_fast_fp16")
                return True

        t.Builder = Builder10
    else:
        t.Builder = Builder

    class Engine:
        def __init__(self, header, model, device):
            self.header, self.device = header, device
            (self.input, self.in_dims), = [(n, s) for n, s in _onnx_io(model)[0]]
            _, outs, self.session = _onnx_io(model)
            self.outputs = outs
            self.names = [self.input] + [n for n, _ in outs]

        @property
        def num_io_tensors(self):
            return len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return t.TensorIOMode.INPUT if name == self.input else t.TensorIOMode.OUTPUT

        def dims(self, name):
            return self.in_dims if name == self.input else dict(self.outputs)[name]

        def get_tensor_shape(self, name):
            return tuple(d if isinstance(d, int) else -1 for d in self.dims(name))

        def get_tensor_dtype(self, name):
            return t.DataType.HALF if self.header["half_outputs"] and name != self.input else t.DataType.FLOAT

        def get_tensor_profile_shape(self, name, profile_index):
            if name != self.input or profile_index != 0:
                raise RuntimeError("no profile for that tensor")
            return [tuple(s) for s in self.header["profile"]]

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.shape, self.addresses = engine, None, {}

        def set_input_shape(self, name, shape):
            lo, _, hi = self.engine.header["profile"]
            shape = tuple(int(d) for d in shape)
            if name != self.engine.input or len(shape) != len(lo) or \
                    any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
                return False  # the previous shape stays in force
            self.shape = shape
            return True

        def get_tensor_shape(self, name):
            e = self.engine
            if name == e.input:
                return self.shape or e.get_tensor_shape(name)
            sym = {d: self.shape[i] for i, d in enumerate(e.in_dims) if isinstance(d, str) and self.shape}
            return tuple(d if isinstance(d, int) else sym.get(d, -1) for d in e.dims(name))

        def set_tensor_address(self, name, ptr):
            if name not in self.engine.names:
                return False
            self.addresses[name] = int(ptr)
            return True

        def execute_async_v3(self, stream_handle):
            e = self.engine
            if int(stream_handle) not in cuda.streams or cuda.current() != e.device or self.shape is None:
                return False
            bufs = {}
            for name in e.names:
                dev, buf = cuda.memory.get(self.addresses.get(name), (None, None))
                if buf is None or dev != e.device:
                    return False
                bufs[name] = buf
            n = int(np.prod(self.shape))
            if len(bufs[e.input]) < 4 * n:
                return False
            x = np.frombuffer(bytes(bufs[e.input][:4 * n]), np.float32).reshape(self.shape)
            if e.header["fp16"]:
                x = x.astype(np.float16).astype(np.float32)
            outs = e.session.run(None, {e.input: x})
            for (name, _), y in zip(e.outputs, outs):
                y = np.ascontiguousarray(y, np.float32)
                if e.header["fp16"]:
                    y = y.astype(np.float16).astype(np.float32)
                if tuple(y.shape) != self.get_tensor_shape(name) or len(bufs[name]) < y.nbytes:
                    return False
                bufs[name][:y.nbytes] = y.tobytes()
            return True

    class Runtime:
        def __init__(self, logger):
            if not cuda.devices:
                raise FakeCrash("TensorRT Runtime created without a CUDA device")

        def deserialize_cuda_engine(self, serialized):
            data = bytes(serialized)
            if state.refuse_deserialize or not data.startswith(MAGIC):
                return None
            try:
                head, model = data[len(MAGIC):].split(b"\n", 1)
                header = json.loads(head)
            except ValueError:
                return None
            device = cuda.current()
            if header["tensorrt"] != version or header["cc"] != list(cuda.devices[device].compute_capability):
                return None  # an engine of another TensorRT or GPU
            state.deserialized += 1
            return Engine(header, model, device)

    t.Runtime = Runtime
    t.OnnxParser = OnnxParser
    t.nptype = lambda dt: {t.DataType.FLOAT: np.float32, t.DataType.HALF: np.float16}[dt]
    t.volume = lambda shape: int(np.prod(shape))
    return t


class FakeGpu:
    """Installs the fakes: sys.modules, the ctypes device probe, the wheels' CUDA major."""

    def __init__(self, monkeypatch, cache: Path, version="10.8.0.43", devices=1, driver=12080,
                 runtime=12080, trt_cuda: int | None = 12):
        self.gpus = [trt_backend.GpuInfo(f"Fake GPU {i}", (9, i), i, driver) for i in range(devices)]
        self.cuda = FakeCuda(self.gpus, runtime)
        self.state = FakeTrtState()
        self.cudart = self.cuda.module()
        self.trt = make_tensorrt(self.cuda, self.state, version)
        self.cache = cache
        cuda_pkg, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
        cuda_pkg.bindings, bindings.runtime = bindings, self.cudart
        for name, mod in (("cuda", cuda_pkg), ("cuda.bindings", bindings), ("cuda.bindings.runtime", self.cudart),
                          ("tensorrt", self.trt)):
            monkeypatch.setitem(sys.modules, name, mod)
        monkeypatch.setattr(trt_backend, "cuda_device",
                            lambda index=0, libname="libcuda.so.1": self.gpus[index] if index < len(self.gpus) else None)
        monkeypatch.setattr(trt_backend, "installed_tensorrt_cuda", lambda: trt_cuda)
        monkeypatch.setenv("STEMLIVE_CACHE", str(cache))

    def live_buffers(self) -> int:
        return len(self.cuda.memory) + len(self.cuda.streams)


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A factory: ``fake_gpu(version=..., devices=..., driver=..., runtime=..., trt_cuda=...)``."""
    made = []

    def install(**kw):
        made.append(FakeGpu(monkeypatch, tmp_path / "cache", **kw))
        return made[-1]

    yield install
    for fake in made:  # every test must leave no device memory or stream behind
        gc.collect()
        assert fake.live_buffers() == 0, (fake.cuda.memory.keys(), fake.cuda.streams)


@pytest.fixture
def tiny(tmp_path):
    """A tiny model and its card (input (N, 1, 4, 4); outputs y = 2·relu(x), s = sum)."""
    return cards.load_card(write_tiny_card(tmp_path, "pacbed-align"))


def shipped(task_prefix: str):
    return [c for c in find_cards(SHIPPED_DIR) if c.task.startswith(task_prefix)]


# -- 1. TensorRT 11 ----------------------------------------------------------------------------
def test_tensorrt_11_is_refused_before_any_builder_exists(fake_gpu, tiny, caplog):
    fake = fake_gpu(version="11.4.0.106")
    assert not hasattr(fake.trt.Builder, "platform_has_fast_fp16") and "FP16" not in fake.trt.BuilderFlag.__members__
    with pytest.raises(BackendUnavailable, match=r"TensorRT 11\.4\.0\.106 is not supported.*BuilderFlag\.FP16"):
        trt_backend.TensorRTBackend.load(tiny.onnx_path)
    assert fake.state.builders == []
    with caplog.at_level(logging.WARNING):
        be = load_backend(tiny.onnx_path, "auto")
    assert be.name == "onnxruntime" and "TensorRT 11.4.0.106 is not supported" in caplog.text


def test_fp16_build_never_asks_platform_has_fast_fp16(fake_gpu, tiny, tmp_path):
    fake = fake_gpu(version="10.8.0.43")
    with trt_backend.TensorRTBackend.load(tiny.onnx_path, trt_backend.EngineSettings(fp16=True)) as be:
        assert json.loads(be.engine_file.read_bytes()[len(MAGIC):].split(b"\n")[0])["fp16"] is True
    assert "platform_has_fast_fp16" not in fake.state.events
    # on TensorRT 11's API an FP16 build is refused by name, not with an AttributeError
    fake11 = make_tensorrt(fake.cuda, fake.state, "11.4.0.106")
    with pytest.raises(BackendUnavailable, match="no BuilderFlag.FP16"):
        trt_backend.build_engine(tiny.onnx_path, trt_backend.EngineSettings(fp16=True), tmp_path / "x.engine", fake11)
    trt_backend.build_engine(tiny.onnx_path, trt_backend.EngineSettings(), tmp_path / "x.engine", fake11)


def test_default_settings_are_fp32_and_the_engine_matches_onnxruntime(fake_gpu, tiny):
    fake_gpu()
    x = np.random.default_rng(0).normal(size=(300, 1, 4, 4)).astype(np.float32)
    ref = OnnxRuntimeBackend.load(tiny.onnx_path)(x)
    with trt_backend.TensorRTBackend.load(tiny.onnx_path) as be:
        assert be.settings == trt_backend.EngineSettings() and not be.settings.fp16
        out = be(x)  # 300 > max_batch 256: split in two runs
    for k in ref:
        np.testing.assert_array_equal(out[k], ref[k])


# -- 2. fallback on any load error -------------------------------------------------------------
@pytest.mark.parametrize("fault,error,reason", [
    ("build", RuntimeError, "TensorRT failed to build an engine"),
    ("attribute", AttributeError, "has no attribute 'OnnxParser'"),
    ("cuda", trt_backend.CudaError, r"cudaSetDevice\(0\) failed: cudaErrorInsufficientDriver"),
    ("deserialize", trt_backend.EngineUnreadable, "could not deserialize"),
    ("driver", BackendUnavailable, r"needs a driver for CUDA 12\.2 \(r535 or newer\)"),
])
def test_auto_falls_back_to_onnxruntime_on_any_load_error(fake_gpu, tiny, monkeypatch, caplog, fault, error, reason):
    fake = fake_gpu(driver=12000 if fault == "driver" else 12080)
    if fault == "build":
        fake.state.fail_build = True
    elif fault == "attribute":
        monkeypatch.delattr(fake.trt, "OnnxParser")
    elif fault == "cuda":
        monkeypatch.setattr(fake.cudart, "cudaSetDevice", lambda d: (cudaError_t.cudaErrorInsufficientDriver,))
    elif fault == "deserialize":
        fake.state.refuse_deserialize = True
    with caplog.at_level(logging.WARNING):
        be = load_backend(tiny.onnx_path, "auto")
    assert be.name == "onnxruntime"
    assert "using onnxruntime on the CPU" in caplog.text and re.search(reason, caplog.text), caplog.text
    if fault != "driver":  # an unexpected fault names its type
        assert f"{error.__name__}: " in caplog.text
    with pytest.raises(error, match=reason):  # asked for explicitly: no fallback
        load_backend(tiny.onnx_path, "tensorrt")


# -- 3. CUDA majors and drivers ------------------------------------------------------------------
def test_cuda13_wheels_on_an_older_driver_are_refused_before_tensorrt(fake_gpu, tiny, monkeypatch):
    fake = fake_gpu(driver=12080, runtime=13000, trt_cuda=13)
    monkeypatch.delitem(sys.modules, "tensorrt")  # importing it now would say "not installed"
    with pytest.raises(BackendUnavailable) as err:
        trt_backend.TensorRTBackend.load(tiny.onnx_path)
    assert "driver supports CUDA 12.8" in str(err.value) and "r580" in str(err.value)
    assert "stemlive[tensorrt]" in str(err.value) and "tensorrt" not in sys.modules
    assert fake.cuda.calls == []  # not even cuda-python was asked


def test_mismatched_tensorrt_and_cuda_python_are_refused(fake_gpu, tiny):
    fake_gpu(driver=13000, runtime=13000, trt_cuda=12)
    with pytest.raises(BackendUnavailable, match="TensorRT is built for CUDA 12 but cuda-python for CUDA 13"):
        trt_backend.TensorRTBackend.load(tiny.onnx_path)


def test_cuda13_on_a_new_driver_loads_and_keys_by_cuda_major(fake_gpu, tiny):
    fake_gpu(driver=13000, runtime=13000, trt_cuda=13)
    with trt_backend.TensorRTBackend.load(tiny.onnx_path) as be:
        assert be.platform.cuda_major == 13
        p12 = replace(be.platform, cuda_major=12)
        assert trt_backend.engine_path(tiny.onnx_path, be.settings, p12) != be.engine_file


def test_extras_pin_what_the_code_supports_and_readme_names_the_drivers():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras["tensorrt"]) == {"tensorrt-cu12>=10.8,<11", "cuda-python>=12.6.1,<13"}
    assert set(extras["tensorrt-cu13"]) == {"tensorrt-cu13>=10.13.3,<11", "cuda-python>=13,<14"}
    lo, hi = trt_backend.TENSORRT_SUPPORTED
    assert lo <= (10, 8) and hi == (11, 0)
    assert {k: v[1] for k, v in trt_backend.CUDA_MAJORS.items()} == {12: "r535", 13: "r580"}
    readme = (ROOT / "README.md").read_text()
    install = readme[readme.index("## Install"):readme.index("## Commands")]
    assert "r535" in install and "r580" in install and "stemlive[tensorrt-cu13]" in install


# -- 4. one settings object; the manifest; models before the detector ----------------------------
def test_export_then_load_uses_the_exported_engines_without_building(fake_gpu, capsys):
    from stemlive.live.cli import main
    from stemlive.models.atom_analysis import AtomFinder
    from stemlive.models.pacbed_analysis import PacbedAnalyzer

    fake = fake_gpu()
    assert main(["export", "engines"]) == 0
    out = capsys.readouterr().out
    n = len(find_cards(SHIPPED_DIR))
    assert out.count(": built ") == n and fake.state.builds == n
    builds = fake.state.builds
    an = PacbedAnalyzer.for_acquisition(200, 13.6, backend="tensorrt")
    finder = AtomFinder.shipped("haadf", backend="tensorrt")
    assert fake.state.builds == builds  # export's engines are the runtime's: nothing rebuilt
    assert not any(b.built_now for b in (an.align, an.thickness_tilt, finder.backend))
    for b in (an.align, an.thickness_tilt, finder.backend):
        b.close()
    # a non-default export (FP16, another batch limit) is what later loads use, through the manifest
    assert main(["export", "engines", "--fp16", "--max-batch", "128"]) == 0
    builds = fake.state.builds
    an = PacbedAnalyzer.for_acquisition(200, 13.6, backend="auto")
    finder = AtomFinder.shipped("abf", backend="auto")
    assert fake.state.builds == builds
    assert an.align.name == "tensorrt" and an.align.settings.fp16 and an.align.settings.max_batch == 128
    assert finder.backend.settings.fp16 and finder.backend.settings.max_batch == 4
    for b in (an.align, an.thickness_tilt, finder.backend):
        b.close()


def test_export_and_runtime_settings_are_one_object():
    from stemlive.models.atom_analysis import atom_engine_settings

    for card in find_cards(SHIPPED_DIR):
        s = trt_backend.settings_for_task(card.task)
        assert not s.fp16
        if card.task.startswith("atoms-"):
            assert s == atom_engine_settings()  # what AtomFinder asks for
        else:
            assert s == trt_backend.EngineSettings()  # what PacbedAnalyzer asks for (nothing)


def test_export_reports_a_failing_model_and_goes_on(fake_gpu, tmp_path, tiny, capsys):
    from stemlive.live.cli import main

    fake = fake_gpu()
    fake.state.fail_build = True
    assert main(["export", "engines", "--models", str(tiny.path.parent)]) == 1
    assert "tiny-1: failed: RuntimeError: TensorRT failed to build" in capsys.readouterr().err
    assert main(["export", "engines", "--max-batch", "0"]) == 2


def test_a_broken_manifest_is_ignored_with_a_warning(fake_gpu, tiny, caplog):
    fake_gpu()
    path, _ = trt_backend.export_engine(tiny.onnx_path, trt_backend.EngineSettings(max_batch=8, opt_batch=8))
    with trt_backend.TensorRTBackend.load(tiny.onnx_path) as be:
        assert be.settings.max_batch == 8 and not be.built_now
        manifest = trt_backend.manifest_path(tiny.onnx_path, be.platform)
    doc = json.loads(manifest.read_text())
    doc["settings"]["surprise"] = 1
    manifest.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING), trt_backend.TensorRTBackend.load(tiny.onnx_path) as be:
        assert be.settings == trt_backend.EngineSettings()
    assert "ignoring engine manifest" in caplog.text


def test_live_loads_the_models_before_connecting_to_the_detector(monkeypatch, tmp_path):
    from stemlive.live import acquire, pipeline
    from stemlive.live.pipeline import AcquisitionError, Settings

    order = []
    monkeypatch.setattr(pipeline, "load_analyzer", lambda s: order.append("pacbed") or "analyzer")

    def stitcher(s, grid):
        order.append(f"atoms {grid.scan_shape}")
        return None

    monkeypatch.setattr(pipeline, "load_atom_stitcher", stitcher)
    monkeypatch.setattr(trt_backend, "cuda_device", lambda index=0, libname="": trt_backend.GpuInfo("Fake", (9, 0)))

    def connect(*a):
        order.append("connect")
        raise AcquisitionError("stop here")

    monkeypatch.setattr(acquire, "_connect", connect)
    settings = Settings(block=(8, 8), alpha_mrad=13.6, kv=200, out=tmp_path / "r.h5")
    with pytest.raises(AcquisitionError, match="stop here"):
        acquire.live(settings, detector="merlin", api_host="127.0.0.1", api_port=1, data_host="127.0.0.1",
                     data_port=2, scan_shape=(32, 48), mode="passive", ctx=object())
    assert order == ["pacbed", "atoms (32, 48)", "connect"]
    order.clear()  # onnxruntime: nothing to build, the pipeline loads the atom network once
    with pytest.raises(AcquisitionError):
        acquire.live(replace(settings, backend="onnxruntime"), detector="merlin", api_host="127.0.0.1", api_port=1,
                     data_host="127.0.0.1", data_port=2, scan_shape=(32, 48), ctx=object())
    assert order == ["pacbed", "connect"]


# -- 5. shapes outside the profile ---------------------------------------------------------------
def test_inputs_outside_the_profile_raise_and_never_run_on_stale_shapes(fake_gpu):
    from stemlive.models.atom_analysis import atom_engine_settings

    fake_gpu()
    (card,) = [c for c in shipped("atoms-haadf")]
    ref = OnnxRuntimeBackend.load(card.onnx_path)
    rng = np.random.default_rng(1)
    with trt_backend.TensorRTBackend.load(card.onnx_path, atom_engine_settings()) as be:
        assert be.profile == ((1, 1, 8, 8), (1, 1, 512, 512), (4, 1, 1024, 1024))
        for h, w in [(8, 8), (8, 64), (16, 16), (24, 200), (64, 64)]:
            x = rng.normal(size=(1, 1, h, w)).astype(np.float32)
            np.testing.assert_array_equal(be(x)["columns"], ref(x)["columns"])
        for shape in [(1, 1, 4, 64), (1, 1, 1032, 64)]:
            with pytest.raises(ValueError, match="outside the TensorRT engine's optimisation profile"):
                be(np.zeros(shape, np.float32))
        # the engine's own answer counts too: with our pre-check out of the way (a profile wider
        # than the engine's), set_input_shape's False is what stops the run
        be.profile = ((1, 1, 1, 1), be.profile[1], be.profile[2])
        with pytest.raises(ValueError, match="TensorRT refused it"):
            be(np.zeros((1, 1, 4, 64), np.float32))
        assert be.context.shape == (1, 1, 64, 64)  # what a run would have used: the last shape


# -- 6. metadata on every backend ----------------------------------------------------------------
@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_card_metadata_is_checked_on_every_backend(fake_gpu, tiny, backend):
    from stemlive.models.pacbed_analysis import PacbedAnalyzer

    fake_gpu()
    be = PacbedAnalyzer._load(tiny, backend, None)
    assert be.name == backend and be.metadata()[cards.META_ID] == "tiny-1"
    be.close()
    cards.write_metadata(tiny.onnx_path, dict(tiny.data, id="stray"))  # another model's file ...
    data = dict(tiny.data, onnx_sha256=cards.sha256_of(tiny.onnx_path))  # ... its sha256 accepted
    tiny.path.write_text(json.dumps(data))
    with pytest.raises(cards.ModelMismatch, match="says it is 'stray'"):
        PacbedAnalyzer._load(cards.load_card(tiny.path), backend, None)
    gc.collect()


def test_onnx_metadata_reader_agrees_with_onnx():
    import onnx

    for card in find_cards(SHIPPED_DIR):
        want = {p.key: p.value for p in onnx.load(str(card.onnx_path)).metadata_props}
        assert cards.onnx_metadata(card.onnx_path) == want and want[cards.META_ID] == card.id


# -- 7. the device -------------------------------------------------------------------------------
def test_device_n_is_selected_before_build_deserialize_and_every_run(fake_gpu, tiny):
    fake = fake_gpu(devices=2)
    with trt_backend.TensorRTBackend.load(tiny.onnx_path, device=1) as be:
        assert fake.state.builders == [1]  # built on device 1 ...
        assert be.platform.gpu == fake.gpus[1]  # ... under device 1's key
        assert be.engine_file == trt_backend.engine_path(tiny.onnx_path, be.settings, be.platform)
        first_set = [c for c, _ in fake.cuda.calls].index("cudaSetDevice")
        assert first_set < [c for c, _ in fake.cuda.calls].index("cudaMalloc")
        box = {}
        worker = threading.Thread(target=lambda: box.update(out=be(np.ones((2, 1, 4, 4), np.float32))))
        worker.start()  # a new thread's current device is 0: run() must select device 1 again
        worker.join()
        assert np.allclose(box["out"]["y"], 2)


# -- 8. a cached engine that does not deserialize --------------------------------------------------
def test_an_unreadable_cached_engine_is_rebuilt_once(fake_gpu, tiny, caplog):
    fake = fake_gpu()
    with trt_backend.TensorRTBackend.load(tiny.onnx_path) as be:
        path = be.engine_file
    path.write_bytes(b"torn")
    with caplog.at_level(logging.WARNING), trt_backend.TensorRTBackend.load(tiny.onnx_path) as be:
        assert be.built_now and fake.state.builds == 2
    assert "could not deserialize" in caplog.text and "rebuilding it once" in caplog.text
    fake.state.refuse_deserialize = True
    with pytest.raises(trt_backend.EngineUnreadable):
        trt_backend.TensorRTBackend.load(tiny.onnx_path)
    assert fake.state.builds == 3  # one rebuild, then the error


def test_cache_key_separates_cuda_majors_and_tensorrt_versions(fake_gpu, tiny):
    gpu = trt_backend.GpuInfo("NVIDIA H100", (9, 0))
    s = trt_backend.EngineSettings()
    keys = {trt_backend.engine_cache_key("abc", s, trt_backend.Platform(v, c, gpu))
            for v in ("10.8.0.43", "10.13.3.9") for c in (12, 13)}
    assert len(keys) == 4


# -- 9. dtypes, temporary files, stream and buffers ------------------------------------------------
def test_non_float32_io_is_refused(fake_gpu, tiny):
    fake = fake_gpu()
    fake.state.half_outputs = True
    with pytest.raises(RuntimeError, match=r"must be float32 \(y: HALF, s: HALF\)"):
        trt_backend.TensorRTBackend.load(tiny.onnx_path)


def test_engine_files_are_written_atomically_by_concurrent_threads(tmp_path, monkeypatch):
    out = tmp_path / "e" / "m.engine"
    payloads = [bytes([i]) * 100_000 for i in range(8)]
    errors = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: time.sleep(0.05) or fsync(fd))  # all writers overlap

    def write(p):
        try:
            trt_backend.write_atomically(out, p)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and out.read_bytes() in payloads and sorted(os.listdir(out.parent)) == ["m.engine"]

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        trt_backend.write_atomically(out, b"x")
    assert sorted(os.listdir(out.parent)) == ["m.engine"]  # no temporary file left behind


def test_close_frees_buffers_and_destroys_the_stream(fake_gpu, tiny):
    fake = fake_gpu()
    be = trt_backend.TensorRTBackend.load(tiny.onnx_path)
    assert len(fake.cuda.streams) == 1 and len(fake.cuda.memory) == 3
    be.close()
    assert fake.live_buffers() == 0
    be.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        be(np.zeros((1, 1, 4, 4), np.float32))
    be = trt_backend.TensorRTBackend.load(tiny.onnx_path)
    del be  # never closed: garbage collection frees them
    gc.collect()
    assert fake.live_buffers() == 0
    assert [c for c, _ in fake.cuda.calls].count("cudaStreamDestroy") == 2


# -- 10. the atom profile covers what the finder sends -------------------------------------------
def test_atom_profile_is_tuned_for_the_tile_and_covers_every_finder_input(fake_gpu):
    from stemlive.models.atom_analysis import TILE, AtomFinder, atom_engine_settings

    s = atom_engine_settings()
    assert s.opt_edge == TILE and s.min_edge <= 8 and s.max_edge >= TILE
    fake = fake_gpu()
    finder = AtomFinder.shipped("haadf", backend="tensorrt")
    assert finder.backend.settings == s
    seen = []
    run = finder.backend.run
    finder.backend.run = lambda x: seen.append(x.shape) or run(x)
    rng = np.random.default_rng(2)
    for h, w in [(8, 8), (13, 700), (96, 96), (520, 530)]:
        finder.heatmap(rng.normal(size=(h, w)))
    lo, _, hi = finder.backend.profile
    assert seen and all(all(a <= d <= b for d, a, b in zip(shape, lo, hi)) for shape in seen), seen
    finder.backend.close()
    assert fake.state.builds == 1


# -- the smoke script --------------------------------------------------------------------------
def test_gpu_smoke_cpu_only_passes_and_says_what_it_skipped():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--cpu-only"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SKIP tensorrt: --cpu-only given" in res.stdout
    assert "FAIL" not in res.stdout and "PASS" in res.stdout


def test_gpu_smoke_tensorrt_part_runs_against_the_fakes(fake_gpu, capsys):
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "benchmarks" / "gpu_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    fake_gpu()
    assert smoke.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "SKIP tensorrt" not in out
    for line in ("second load hit the cache", "outside the profile raises", "pacbed analyze", "atoms find"):
        assert line in out
