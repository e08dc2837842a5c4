"""Inference backends and model cards (a tiny hand-made ONNX graph; no torch needed)."""
import dataclasses
import json
import logging
import sys

import numpy as np
import pytest

from stemlive.models import cards
from stemlive.models.backends import BackendUnavailable, OnnxRuntimeBackend, load_backend
from stemlive.models.backends import tensorrt as trt_backend


def tiny_onnx(path):
    """y = 2·relu(x), s = sum over (C, H, W): input (N, 1, 4, 4)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 4, 4])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 1])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    axes = helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["r", "two"], ["y"]),
             helper.make_node("ReduceSum", ["y", "axes"], ["s0"], keepdims=0),
             helper.make_node("Unsqueeze", ["s0", "one"], ["s"])]
    one = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(nodes, "tiny", [x], [y, s], initializer=[two, axes, one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def write_tiny_card(directory, task: str = "pacbed-thickness-tilt"):
    """A tiny model and its card (input (N, 1, 4, 4); outputs y = 2·relu(x), s = sum): the card's path."""
    onnx_path = tiny_onnx(directory / "tiny.onnx")
    data = {"id": "tiny-1", "task": task, "onnx_file": "tiny.onnx",
            "input": {"shape": [1, 4, 4], "normalisation": "none"}, "outputs": {"y": "a.u.", "s": "a.u."},
            "training": {"kv": 200.0, "alpha_mrad": 13.6, "material": "SrTiO3", "zone": "[001]"},
            "validation": {}}
    cards.write_metadata(onnx_path, data)
    data["onnx_sha256"] = cards.sha256_of(onnx_path)
    card_path = directory / "tiny.json"
    card_path.write_text(json.dumps(data))
    return card_path


@pytest.fixture
def model(tmp_path):
    return write_tiny_card(tmp_path)


def test_onnxruntime_runs_and_checks_input(model):
    card = cards.load_card(model)
    be = OnnxRuntimeBackend.load(card.onnx_path)
    x = np.random.default_rng(0).normal(size=(3, 1, 4, 4)).astype(np.float32)
    out = be(x)
    assert np.allclose(out["y"], 2 * np.maximum(x, 0))
    assert np.allclose(out["s"][:, 0], out["y"].sum(axis=(1, 2, 3)), rtol=1e-5)
    with pytest.raises(ValueError, match=r"input must be \(N, 1, 4, 4\)"):
        be(np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        be(np.full((1, 1, 4, 4), np.nan, np.float32))
    cards.verify(card, be.metadata())


def test_card_refuses_modified_model(model):
    card = cards.load_card(model)
    with open(card.onnx_path, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(cards.ModelMismatch, match="tiny.onnx does not match its card tiny.json"):
        cards.verify(card)


def test_card_refuses_foreign_metadata(model, tmp_path):
    card = cards.load_card(model)
    data = dict(card.data, id="other")
    cards.write_metadata(card.onnx_path, data)
    data["onnx_sha256"] = cards.sha256_of(card.onnx_path)
    model.write_text(json.dumps(dict(card.data, onnx_sha256=data["onnx_sha256"])))
    card = cards.load_card(model)
    with pytest.raises(cards.ModelMismatch, match="says it is 'other'"):
        cards.verify(card, OnnxRuntimeBackend.load(card.onnx_path).metadata())


def test_card_missing_fields_and_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"id": "x"}))
    with pytest.raises(cards.ModelMismatch, match="lacks task"):
        cards.load_card(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cards.load_card(tmp_path / "none.json")


def test_model_selection_by_kv_and_alpha(model):
    found = cards.find_cards(model.parent)
    assert cards.select(found, "pacbed-thickness-tilt", 200, 13.7).id == "tiny-1"
    with pytest.raises(ValueError, match=r"no pacbed-thickness-tilt model for 300 kV and 13.6 mrad.*available: tiny-1"):
        cards.select(found, "pacbed-thickness-tilt", 300, 13.6)
    with pytest.raises(ValueError, match="19.1 mrad"):
        cards.select(found, "pacbed-thickness-tilt", 200, 19.1)


def test_no_cuda_device_here_and_tensorrt_never_imported():
    assert trt_backend.cuda_device(libname="libdoes-not-exist.so") is None
    if trt_backend.cuda_device() is not None:
        pytest.skip("a CUDA device is present")
    with pytest.raises(BackendUnavailable, match="no CUDA device"):
        trt_backend.TensorRTBackend.load(__file__)
    assert "tensorrt" not in sys.modules


def test_auto_falls_back_to_cpu_with_a_warning(model, caplog):
    if trt_backend.cuda_device() is not None:
        pytest.skip("a CUDA device is present")
    card = cards.load_card(model)
    with caplog.at_level(logging.WARNING):
        be = load_backend(card.onnx_path, "auto")
    assert be.name == "onnxruntime"
    assert "using onnxruntime on the CPU" in caplog.text and "no CUDA device" in caplog.text
    with pytest.raises(BackendUnavailable):
        load_backend(card.onnx_path, "tensorrt")
    with pytest.raises(ValueError, match="unknown backend"):
        load_backend(card.onnx_path, "cuda")


def test_engine_cache_key_covers_every_dependency(model, tmp_path):
    gpu = trt_backend.GpuInfo("NVIDIA H100", (9, 0))
    plat = trt_backend.Platform("10.8.0.43", 12, gpu)
    s = trt_backend.EngineSettings()
    base = trt_backend.engine_cache_key("abc", s, plat)
    variants = [
        trt_backend.engine_cache_key("abd", s, plat),
        trt_backend.engine_cache_key("abc", trt_backend.EngineSettings(fp16=True), plat),
        trt_backend.engine_cache_key("abc", trt_backend.EngineSettings(max_batch=128), plat),
        trt_backend.engine_cache_key("abc", s, trt_backend.Platform("10.9.0.34", 12, gpu)),
        trt_backend.engine_cache_key("abc", s, trt_backend.Platform("10.8.0.43", 13, gpu)),
        trt_backend.engine_cache_key("abc", s, trt_backend.Platform("10.8.0.43", 12, trt_backend.GpuInfo("NVIDIA A100", (9, 0)))),
        trt_backend.engine_cache_key("abc", s, trt_backend.Platform("10.8.0.43", 12, trt_backend.GpuInfo("NVIDIA H100", (8, 0)))),
    ]
    assert len({base, *variants}) == 8
    assert base == trt_backend.engine_cache_key("abc", s, plat)  # stable
    # the driver version and device index do not change an engine: no rebuild after a driver update
    same = trt_backend.Platform("10.8.0.43", 12, trt_backend.GpuInfo("NVIDIA H100", (9, 0), 3, 13000))
    assert trt_backend.engine_cache_key("abc", s, same) == base
    onnx_path = cards.load_card(model).onnx_path
    p = trt_backend.engine_path(onnx_path, s, plat, tmp_path)
    assert p.parent == tmp_path and p.name.startswith("tiny-") and p.suffix == ".engine"
    m = trt_backend.manifest_path(onnx_path, plat, tmp_path)
    assert m.parent == tmp_path and m.name.endswith(".manifest.json") and m != p


def test_engine_settings_are_validated():
    s = trt_backend.EngineSettings()
    assert s.with_max_batch(16) == trt_backend.EngineSettings(opt_batch=16, max_batch=16)
    assert trt_backend.EngineSettings.from_dict(dataclasses.asdict(s)) == s
    for bad in ({"max_batch": 0}, {"opt_batch": 300}, {"fp16": 1}, {"min_edge": 2048}, {"workspace_mb": True}):
        with pytest.raises(ValueError):
            trt_backend.EngineSettings(**bad)
    with pytest.raises(ValueError, match="exactly the fields"):
        trt_backend.EngineSettings.from_dict({**dataclasses.asdict(s), "int8": True})


def test_tensorrt_versions_and_drivers_are_checked_by_name():
    trt_backend.check_tensorrt_version("10.8.0.43")
    trt_backend.check_tensorrt_version("10.13.3.9")
    for bad in ("11.0.0.1", "9.3.0", "ten"):
        with pytest.raises(BackendUnavailable):
            trt_backend.check_tensorrt_version(bad)
    old = trt_backend.GpuInfo("GPU", (8, 6), 0, 12040)  # an r550 driver: CUDA 12.4
    trt_backend.check_driver(old, 12, "tensorrt-cu12")
    with pytest.raises(BackendUnavailable, match=r"driver supports CUDA 12\.4.*CUDA 13\.0 \(r580 or newer\).*"
                                                 r"stemlive\[tensorrt\] \(CUDA 12, driver r535\+\)"):
        trt_backend.check_driver(old, 13, "tensorrt-cu13")
    with pytest.raises(BackendUnavailable, match="CUDA 11"):
        trt_backend.check_driver(old, 11, "tensorrt-cu11")
    assert trt_backend.cuda_version(12080) == "12.8" and trt_backend.cuda_version(13000) == "13.0"


def test_installed_tensorrt_cuda_from_package_metadata(monkeypatch):
    from importlib import metadata

    assert trt_backend.installed_tensorrt_cuda() is None  # no TensorRT wheels here
    present = {"tensorrt-cu13-libs"}

    def version(name):
        if name in present:
            return "10.13.3.9"
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", version)
    assert trt_backend.installed_tensorrt_cuda() == 13
    present.add("tensorrt-cu12")
    with pytest.raises(BackendUnavailable, match="CUDA 12 and 13 are installed together"):
        trt_backend.installed_tensorrt_cuda()


def test_onnx_metadata_without_onnx_or_a_session(model, tmp_path):
    card = cards.load_card(model)
    meta = cards.onnx_metadata(card.onnx_path)
    assert meta == OnnxRuntimeBackend.load(card.onnx_path).metadata() and meta[cards.META_ID] == "tiny-1"
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x0a\xff")  # field 1, then a length whose varint never ends
    with pytest.raises(cards.ModelMismatch, match="bad.onnx is not a readable ONNX file"):
        cards.onnx_metadata(bad)


def test_backends_close_and_work_as_context_managers(model):
    with OnnxRuntimeBackend.load(cards.load_card(model).onnx_path) as be:
        be(np.zeros((1, 1, 4, 4), np.float32))
    be.close()  # again: harmless


def test_missing_model_file_is_not_a_gpu_problem(tmp_path, caplog):
    with caplog.at_level(logging.WARNING), pytest.raises(FileNotFoundError, match="does not exist"):
        load_backend(tmp_path / "none.onnx", "auto")
    assert "GPU inference" not in caplog.text


def test_shipped_models_declare_every_output_axis_but_the_batch():
    """TensorRT sizes output buffers from the input shape: an output axis the exporter left symbolic
    (other than the batch, or image size for fully convolutional models) cannot be allocated."""
    import onnx

    from stemlive.models.cards import SHIPPED_DIR, find_cards

    for card in find_cards(SHIPPED_DIR):
        model = onnx.load(str(card.path.with_name(card.data["onnx_file"])), load_external_data=False)
        free_in = {d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim if d.dim_param}
        for out in model.graph.output:
            unknown = [d.dim_param for d in out.type.tensor_type.shape.dim if d.dim_param and d.dim_param not in free_in]
            assert not unknown, (card.data["id"], out.name, unknown)
