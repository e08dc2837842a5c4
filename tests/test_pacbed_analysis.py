"""`stemlive pacbed analyze` around the networks: order, errors, exit codes, JSON, model checks."""
import json
import shutil

import numpy as np
import pytest

from stemlive.live.cli import main
from stemlive.models.pacbed_analysis import PacbedAnalyzer, crop_window, wrap45

from .helpers import two_placed_patterns


@pytest.fixture(scope="module")
def raw_patterns(quadrant_library):
    return two_placed_patterns(quadrant_library, seed=0)


def analyze_cli(tmp_path, arr, *extra, models=None):
    src = tmp_path / "in.npy"
    np.save(src, arr)
    out = tmp_path / "out.json"
    args = ["pacbed", "analyze", str(src), "--alpha-mrad", "13.6", "--kv", "200", "--out", str(out), "--overwrite", *extra]
    if models is not None:
        args += ["--models", str(models)]
    rc = main(args)
    return rc, (json.loads(out.read_text()) if out.exists() else None)


def test_every_pattern_in_order_with_the_contract_fields(tiny_models, raw_patterns, tmp_path):
    rc, doc = analyze_cli(tmp_path, raw_patterns, models=tiny_models)
    assert rc == 0 and doc["schema"] == 2 and len(doc["patterns"]) == 2
    assert {m["task"] for m in doc["models"]} == {"pacbed-align", "pacbed-thickness-tilt"}
    for p, centre in zip(doc["patterns"], [(50, 60), (40, 70)]):
        for key in ("center_px", "radius_px", "rotation_deg", "thickness_nm", "thickness_sigma_nm", "tilt_mrad",
                    "tilt_sigma_mrad", "tilt_crystal_mrad", "background", "in_range", "flags"):
            assert key in p and p[key] is not None, key
        assert "error" not in p
        assert -45 < p["rotation_deg"] <= 45 and p["thickness_sigma_nm"] > 0
        # a tiny model cannot align well, but the coarse finder puts it in the right place
        assert np.hypot(*np.subtract(p["center_px"], centre)) < 6


def test_bad_patterns_keep_their_place_and_set_the_exit_status(tiny_models, raw_patterns, tmp_path):
    bad = raw_patterns.astype(float)
    bad[0, 3, 3] = np.nan
    rc, doc = analyze_cli(tmp_path, bad, models=tiny_models)
    assert rc == 3
    assert "NaN" in doc["patterns"][0]["error"] and doc["patterns"][0]["thickness_nm"] is None
    assert doc["patterns"][1].get("error") is None and doc["patterns"][1]["thickness_nm"] is not None
    rc, doc = analyze_cli(tmp_path, np.zeros((2, 64, 64)), models=tiny_models)
    assert rc == 1 and all("constant" in p["error"] for p in doc["patterns"])


@pytest.mark.parametrize("arr,msg", [(np.zeros((2, 3, 64, 64)), "4 dimensions"), (np.zeros((0, 64, 64)), "no data"),
                                     (np.array(["a", "b"]), "not numeric")])
def test_wrong_input_is_a_usage_error(tiny_models, tmp_path, arr, msg, capsys):
    rc, _ = analyze_cli(tmp_path, arr, models=tiny_models)
    assert rc == 2 and msg in capsys.readouterr().err


def test_unknown_setting_lists_the_models(tiny_models, raw_patterns, tmp_path, capsys):
    src = tmp_path / "in.npy"
    np.save(src, raw_patterns)
    rc = main(["pacbed", "analyze", str(src), "--alpha-mrad", "25", "--kv", "300", "--out", str(tmp_path / "o.json"),
               "--models", str(tiny_models)])
    err = capsys.readouterr().err
    assert rc == 2 and "no pacbed-align model for 300 kV and 25 mrad" in err and "13.6 mrad" in err


def test_a_modified_model_file_is_refused_by_name(tiny_models, raw_patterns, tmp_path, capsys):
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    onnx = models / "tiny.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    rc, _ = analyze_cli(tmp_path, raw_patterns, models=models)
    err = capsys.readouterr().err
    assert rc == 2 and "tiny.onnx does not match its card tiny.json" in err


def test_lsf_needs_a_library(tiny_models, raw_patterns, tmp_path, capsys):
    rc, _ = analyze_cli(tmp_path, raw_patterns, "--method", "lsf", models=tiny_models)
    assert rc == 2 and "--library" in capsys.readouterr().err


def test_tiff_stack_reads_like_npy(raw_patterns, tmp_path):
    import tifffile

    from stemlive.models.readers import read_patterns

    tifffile.imwrite(tmp_path / "s.tif", raw_patterns)
    np.save(tmp_path / "s.npy", raw_patterns)
    got = read_patterns(tmp_path / "s.tif")
    assert got.dtype == np.uint16 and np.array_equal(got, read_patterns(tmp_path / "s.npy"))
    assert read_patterns(tmp_path / "s.npy")[:1].shape == (1, 96, 128)


def test_crop_window_keeps_the_centre_and_bins_large_disks():
    frame = np.zeros((2048, 2048), np.float32)
    frame[1500:1504, 700:704] = 1.0  # a 4×4 spot centred on (1501.5, 701.5)
    win, cen, rad = crop_window(frame, (1501.5, 701.5), 400.0)
    b = int(400 / 12.115)
    assert rad == pytest.approx(400 / b) and win.shape[0] < 2048 // b + 2
    assert win.sum() == pytest.approx(16.0)  # binning keeps the counts
    spot = np.array(np.unravel_index(np.argmax(win), win.shape), float)
    assert np.abs(spot - np.asarray(cen)).max() <= 0.5 + 2 / b


def test_wrap45():
    assert [wrap45(x) for x in (0, 44, 46, -46, 90, 135)] == [0, 44, -44, 44, 0, 45]


def test_analyzer_for_acquisition_checks_cards(tiny_models):
    a = PacbedAnalyzer.for_acquisition(200, 13.6, tiny_models)
    assert len(a.thickness_bins) == 4 and a.tilt_max == 2.0


@pytest.mark.parametrize("version", [3, 4])
def test_digitalmicrograph_files_read_and_analyse(tiny_models, raw_patterns, tmp_path, version):
    from stemlive.models.readers import read_patterns

    from .dm_writer import write_dm

    path = tmp_path / f"p.dm{version}"
    write_dm(path, raw_patterns[1], version=version)
    got = read_patterns(path)
    assert got.shape == (1, 96, 128) and np.array_equal(got[0], raw_patterns[1])
    out = tmp_path / "o.json"
    rc = main(["pacbed", "analyze", str(path), "--alpha-mrad", "13.6", "--kv", "200", "--out", str(out),
               "--models", str(tiny_models)])
    assert rc == 0 and len(json.loads(out.read_text())["patterns"]) == 1


def test_damaged_files_get_a_named_error(tmp_path):
    from stemlive.models.readers import read_patterns

    for name, blob in (("bad.dm3", b"\x00\x00\x00\x03garbage"), ("bad.tif", b"II*\x00nonsense"),
                       ("bad.npy", b"not numpy")):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError, match=name):
            read_patterns(tmp_path / name)
    with pytest.raises(ValueError, match="unknown file type '.bmp'"):
        (tmp_path / "x.bmp").write_bytes(b"")
        read_patterns(tmp_path / "x.bmp")
    for name, blob in (("bad.png", b"\x89PNG\r\n\x1a\nnonsense"), ("bad.jpg", b"\xff\xd8\xffnonsense")):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError, match=f"{name}: not a readable"):
            read_patterns(tmp_path / name)


# -- PNG and JPEG exports ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["png8", "png16", "jpg", "rgb-png", "rgba-jpeg-grey"])
def test_png_and_jpeg_read_as_greyscale(raw_patterns, tmp_path, kind):
    from PIL import Image

    from stemlive.models.readers import read_patterns

    p16 = raw_patterns[0]
    p8 = np.round(p16 / p16.max() * 255).astype(np.uint8)
    if kind == "png16":
        Image.fromarray(p16).save(path := tmp_path / "p.png")
        want = p16
    elif kind == "png8":
        Image.fromarray(p8).save(path := tmp_path / "p.png")
        want = p8
    elif kind == "jpg":
        Image.fromarray(p8).save(path := tmp_path / "p.jpg", quality=95)
        want = p8
    elif kind == "rgb-png":  # grey stored as colour: read as the grey value
        Image.fromarray(np.dstack([p8] * 3)).save(path := tmp_path / "p.png")
        want = p8
    else:  # an opaque alpha channel is ignored; JPEG's colour rounding stays within the grey rule
        Image.fromarray(np.dstack([p8] * 3 + [np.full_like(p8, 255)])).save(tmp_path / "q.png")
        Image.open(tmp_path / "q.png").convert("RGB").save(path := tmp_path / "p.jpeg", quality=90)
        want = p8
    got = read_patterns(path)
    assert got.shape == (1, 96, 128) and got.dtype == want.dtype
    tol = 0 if path.suffix == ".png" else 12  # JPEG is lossy
    assert np.abs(got[0].astype(int) - want.astype(int)).max() <= tol


@pytest.mark.parametrize("kind,msg", [("colour", "a colour image"), ("transparent", "transparent pixels"),
                                      ("bilevel", "1-bit"), ("empty", r"empty \(0 bytes\)"),
                                      ("truncated", "not a readable PNG image")])
def test_png_that_is_no_greyscale_pattern_is_refused_by_name(tmp_path, kind, msg):
    from PIL import Image

    from stemlive.models.readers import read_patterns

    g = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
    path = tmp_path / f"{kind}.png"
    if kind == "colour":
        Image.fromarray(np.dstack([g, g[::-1], g])).save(path)
    elif kind == "transparent":
        Image.fromarray(np.dstack([g, g, g, g])).save(path)
    elif kind == "bilevel":
        Image.fromarray(g > 100).save(path)
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        Image.fromarray(g).save(path)
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    with pytest.raises(ValueError, match=f"{kind}.png: .*{msg}"):
        read_patterns(path)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_pacbed_analyze_reads_png_and_jpeg(tiny_models, raw_patterns, tmp_path, suffix):
    """`stemlive pacbed analyze x.png` (the path a user's export takes)."""
    from PIL import Image

    img = raw_patterns[0] if suffix == ".png" else np.round(raw_patterns[0] / raw_patterns[0].max() * 255).astype(np.uint8)
    Image.fromarray(img).save(src := tmp_path / f"x{suffix}")
    out = tmp_path / "o.json"
    rc = main(["pacbed", "analyze", str(src), "--alpha-mrad", "13.6", "--kv", "200", "--out", str(out),
               "--models", str(tiny_models)])
    doc = json.loads(out.read_text())
    assert rc == 0 and len(doc["patterns"]) == 1 and doc["patterns"][0].get("error") is None
    assert np.hypot(*np.subtract(doc["patterns"][0]["center_px"], (50, 60))) < 6


def test_batched_crops_equal_the_per_pattern_crops():
    """The batched canonical crops (one gather interpolation for the stack) are the crops of
    the per-pattern and stack functions, on and off the frame, small and large disks."""
    from stemlive.models import canonical

    rng = np.random.default_rng(3)
    stack = (rng.random((12, 70, 64)) * 1000).astype(np.float32)
    centers = rng.uniform(10, 55, (12, 2))
    radii = rng.uniform(4, 9, 12)
    rotations = rng.uniform(-45, 45, 12)
    centers[0], centers[1] = (0.0, 63.0), (69.0, 2.5)  # on the frame's edge: half the crop off it
    radii[2] = 25.0  # larger than 1.5 canonical disks: smoothed first
    got, got_valid = canonical.to_canonical_batch_valid(stack, centers, radii, rotations)
    small = np.flatnonzero(radii < 1.5 * canonical.ALPHA_PX)
    want, want_valid = canonical.to_canonical_stack_valid(stack[small], centers[small], radii[small], rotations[small])
    np.testing.assert_allclose(got[small], want, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(got_valid[small], want_valid)
    for i in range(len(stack)):
        one, one_valid = canonical.to_canonical_valid(stack[i], centers[i], radii[i], rotations[i])
        np.testing.assert_allclose(got[i], one, rtol=1e-5, atol=1e-3, err_msg=str(i))
        np.testing.assert_array_equal(got_valid[i], one_valid)
    assert got_valid[0].mean() < 0.5 and got_valid.any(axis=(1, 2)).all()
