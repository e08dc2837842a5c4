"""Hostile-but-fair input to `stemlive pacbed analyze` and `stemlive atoms find`: every fault gives a
one-line message and exit 2 (or a per-pattern error), never a traceback, never a damaged input,
never a bogus confident answer."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from stemlive.live.cli import main
from stemlive.models.atoms_cli import read_csv
from stemlive.simulate.library import PacbedLibrary
from stemlive.simulate.scan_cli import SHIPPED_LIBRARY

from .helpers import place

ORT = ["--backend", "onnxruntime"]


@pytest.fixture(scope="module")
def pattern():
    """One valid float64 PACBED (demo library, 20 nm, 1.5 mrad tilt, rotated 10°)."""
    lib = PacbedLibrary.load(SHIPPED_LIBRARY)
    img = place(lib.pattern(20.0, (1.5, 0.0)), lib.alpha_mrad / lib.mrad_per_px, (96, 96), 20.0, (48.0, 46.0), 10.0)
    return np.random.default_rng(0).poisson(img / img.max() * 8000).astype(np.float64)


def lattice(shape=(128, 128), spacing=9.0, sigma=1.5, counts=3.0, seed=0):
    """A square lattice of Gaussian columns under shot noise (``counts`` e/px at a column)."""
    rr, cc = np.indices(shape, dtype=float)
    img = np.zeros(shape)
    for r0 in np.arange(4.2, shape[0], spacing):
        for c0 in np.arange(3.7, shape[1], spacing):
            img += np.exp(-((rr - r0) ** 2 + (cc - c0) ** 2) / (2 * sigma ** 2))
    return np.random.default_rng(seed).poisson(img * counts + 0.5).astype(np.float64)


def strict_load(text: str):
    """json.loads that refuses NaN and Infinity, as strict JSON readers do."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def pacbed(src, out, *extra):
    return main(["pacbed", "analyze", str(src), "--alpha-mrad", "13.6", "--kv", "200", "--out", str(out), *ORT, *extra])


def atoms(src, out, *extra):
    return main(["atoms", "find", str(src), "--out", str(out), *ORT, *extra])


# -- 1. the output rule --------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["pacbed", "atoms"])
def test_output_equal_to_input_is_refused_and_the_input_kept(command, pattern, tmp_path, capsys):
    src = tmp_path / "x.npy"
    np.save(src, pattern)
    before = src.read_bytes()
    run = pacbed if command == "pacbed" else atoms
    (tmp_path / "link.npy").symlink_to(src)
    for out in (src, tmp_path / "link.npy"):
        assert run(src, out, "--overwrite") == 2
        assert "is the input" in capsys.readouterr().err
    assert src.read_bytes() == before


@pytest.mark.parametrize("command", ["pacbed", "atoms"])
def test_an_existing_output_is_replaced_only_with_overwrite_and_only_on_success(command, pattern, tmp_path, capsys,
                                                                                monkeypatch):
    src, out = tmp_path / "x.npy", tmp_path / ("o.json" if command == "pacbed" else "o.csv")
    np.save(src, pattern if command == "pacbed" else lattice())
    out.write_text("earlier result")
    run = pacbed if command == "pacbed" else atoms
    extra = () if command == "pacbed" else ("--sampling-A-per-px", "0.2")
    assert run(src, out, *extra) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "earlier result"
    # runs that fail (no such model; the disk fills while writing) leave the earlier file as it was
    assert run(src, out, "--overwrite", "--models", str(tmp_path / "none"), *extra) == 2
    with monkeypatch.context() as m:
        m.setattr("pathlib.Path.write_text", disk_full)
        m.setattr("stemlive.models.atoms_cli.write_csv", lambda path, *a: disk_full(path, "row_px"))
        assert run(src, out, "--overwrite", *extra) == 2
    assert "No space left" in capsys.readouterr().err
    assert out.read_text() == "earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, out.name])  # no temporary file left
    assert run(src, out, "--overwrite", *extra) == 0
    assert out.read_text() != "earlier result"


def disk_full(path, text, *a, **kw):
    """Write half of ``text``, then fail as a full disk does."""
    with open(path, "w") as fh:
        fh.write(text[:len(text) // 2])
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("command", ["pacbed", "atoms"])
def test_an_output_directory_is_refused_before_models_load(command, pattern, tmp_path, capsys):
    src, out = tmp_path / "x.npy", tmp_path / "results"
    np.save(src, pattern)
    out.mkdir()
    run = pacbed if command == "pacbed" else atoms
    # the models directory is empty: the output is checked first, so the message is about --out
    assert run(src, out, "--models", str(out)) == 2
    assert "is a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results", "x.npy"] and not any(out.iterdir())


def unwritable_dir(tmp_path):
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    return "/sys"  # root may write anywhere else; sysfs refuses new files even to root


@pytest.mark.parametrize("command", ["pacbed", "atoms"])
def test_an_unwritable_output_directory_is_a_usage_error(command, pattern, tmp_path, capsys):
    src = tmp_path / "x.npy"
    np.save(src, pattern)
    out = f"{unwritable_dir(tmp_path)}/stemlive-test/out.txt"
    run = pacbed if command == "pacbed" else atoms
    assert run(src, out) == 2
    assert "cannot write in" in capsys.readouterr().err


# -- 2./3. degenerate and extreme PACBED intensities -----------------------------------------------
def test_intensity_scale_does_not_matter_and_degenerate_patterns_get_errors(pattern, tmp_path, capsys):
    stack = np.stack([pattern, pattern * 3e38, pattern * 1e-40, -pattern, np.zeros_like(pattern),
                      np.full_like(pattern, 7.0)])
    np.save(tmp_path / "in.npy", stack)
    assert pacbed(tmp_path / "in.npy", tmp_path / "out.json") == 3
    doc = strict_load((tmp_path / "out.json").read_text())
    ref, big, tiny, neg, zero, const = doc["patterns"]
    for scaled, factor in ((big, 3e38), (tiny, 1e-40)):
        assert "error" not in scaled
        assert scaled["thickness_nm"] == pytest.approx(ref["thickness_nm"], abs=0.05)
        np.testing.assert_allclose(scaled["tilt_mrad"], ref["tilt_mrad"], atol=0.02)
        np.testing.assert_allclose(scaled["center_px"], ref["center_px"], atol=0.05)
        assert scaled["background"] == pytest.approx(ref["background"] * factor, rel=1e-3)
        assert scaled["in_range"] == ref["in_range"] and scaled["flags"] == ref["flags"]
    assert "total intensity is ≤ 0" in neg["error"] and neg["thickness_nm"] is None
    assert "constant" in zero["error"] and "constant" in const["error"]
    assert "3 of 6 patterns analysed" in capsys.readouterr().out


def test_one_overflowing_pattern_does_not_discard_the_stack(pattern, tmp_path):
    inf_pixel = pattern.copy()
    inf_pixel[40, 40] = np.inf
    stack = np.stack([pattern, pattern / pattern.max() * 1e39, inf_pixel, pattern])
    np.save(tmp_path / "in.npy", stack)
    assert pacbed(tmp_path / "in.npy", tmp_path / "out.json") == 3
    p = strict_load((tmp_path / "out.json").read_text())["patterns"]
    assert [("error" in r) for r in p] == [False, False, True, False]
    assert "infinite" in p[2]["error"]
    assert p[1]["thickness_nm"] == pytest.approx(p[0]["thickness_nm"], abs=0.05)
    # in the input's units (the library check's background may be slightly negative: none was added)
    assert np.isfinite(p[1]["background"])
    assert p[1]["background"] == pytest.approx(p[0]["background"] * 1e39 / pattern.max(), rel=1e-3)


def test_out_json_has_no_nan_or_infinity():
    from stemlive.models.cli import strict_json

    doc = strict_json({"a": float("nan"), "b": [np.float32(np.inf), 1.5, np.float64(2.0)], "c": (np.int64(3),)})
    assert strict_load(json.dumps(doc, allow_nan=False)) == {"a": None, "b": [None, 1.5, 2.0], "c": [3]}


# -- 4./7. files a user might give -------------------------------------------------------------------
def write(kind, path):
    """Write a bad input of ``kind`` at ``path`` (suffix chosen here); returns the path."""
    import tifffile

    if kind == "empty-npy":
        path.with_suffix(".npy").write_bytes(b"")
    elif kind == "text-npy":
        path.with_suffix(".npy").write_text("row,col\n1,2\n")
    elif kind == "truncated-npy":
        np.save(path.with_suffix(".npy"), np.ones((64, 64)))
        path.with_suffix(".npy").write_bytes(path.with_suffix(".npy").read_bytes()[:1000])
    elif kind == "complex":
        np.save(path.with_suffix(".npy"), np.ones((64, 64), complex))
    elif kind == "strings":
        np.save(path.with_suffix(".npy"), np.array([["a", "b"], ["c", "d"]]))
    elif kind == "4d":
        np.save(path.with_suffix(".npy"), np.ones((2, 3, 32, 32)))
    elif kind == "1x1":
        np.save(path.with_suffix(".npy"), np.ones((1, 1)))
    elif kind == "empty-tif":
        path.with_suffix(".tif").write_bytes(b"")
    elif kind == "rgb-tif":
        tifffile.imwrite(path.with_suffix(".tif"), np.zeros((32, 40, 3), np.uint8), photometric="rgb")
        return path.with_suffix(".tif")
    elif kind == "directory":
        path.with_suffix(".npy").mkdir()
    elif kind in ("colour-png", "truncated-png", "empty-jpg", "text-jpg"):
        from PIL import Image

        out = path.with_suffix("." + kind.split("-")[1])
        g = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
        if kind == "colour-png":
            Image.fromarray(np.dstack([g, g[::-1], g.T])).save(out)
        elif kind == "truncated-png":
            Image.fromarray(g).save(out)
            out.write_bytes(out.read_bytes()[:len(out.read_bytes()) // 2])
        else:
            out.write_text("" if kind == "empty-jpg" else "row,col\n1,2\n")
        return out
    return path.with_suffix(".tif" if "tif" in kind else ".npy")


BAD_FILES = [("empty-npy", "empty (0 bytes)"), ("text-npy", "not a .npy file (no NumPy header"),
             ("truncated-npy", "truncated"), ("complex", "is complex"), ("strings", "not numeric"),
             ("4d", "4 dimensions"), ("1x1", "too small"), ("empty-tif", "not a readable TIFF"),
             ("rgb-tif", "colour"), ("missing", "does not exist"), ("directory", "is a directory"),
             ("colour-png", "a colour image"), ("truncated-png", "not a readable PNG image"),
             ("empty-jpg", "empty (0 bytes), not a JPG image"), ("text-jpg", "not a readable JPG image")]


@pytest.mark.parametrize("command", ["pacbed", "atoms"])
@pytest.mark.parametrize("kind,msg", BAD_FILES)
def test_bad_input_files_are_usage_errors_with_a_message(command, kind, msg, tmp_path, capsys):
    src = write(kind, tmp_path / "in")
    run = pacbed if command == "pacbed" else atoms
    assert run(src, tmp_path / "out.txt") == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out.txt").exists()


# -- 4./5. numbers the atom finder cannot use ---------------------------------------------------------
@pytest.mark.parametrize("value,msg", [("inf", "finite positive"), ("0", "finite positive"), ("-1", "finite positive"),
                                       ("nan", "finite positive"), ("1000", "trained range"),
                                       ("1e-9", "trained range")])
def test_absurd_samplings_are_refused(value, msg, tmp_path, capsys):
    np.save(tmp_path / "img.npy", lattice((64, 64)))
    assert atoms(tmp_path / "img.npy", tmp_path / "a.csv", f"--sampling-A-per-px={value}") == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err, err
    if msg == "trained range":  # says what the network knows and what the image would become
        assert "0.08-0.50 Å/px" in err and " px (allowed" in err
    assert not (tmp_path / "a.csv").exists()


@pytest.mark.parametrize("value", ["nan", "2", "0", "1", "-0.3", "inf"])
def test_threshold_must_lie_in_the_open_unit_interval(value, tmp_path, capsys):
    np.save(tmp_path / "img.npy", lattice((64, 64)))
    assert atoms(tmp_path / "img.npy", tmp_path / "a.csv", "--sampling-A-per-px", "0.2", f"--threshold={value}") == 2
    assert "--threshold" in capsys.readouterr().err and not (tmp_path / "a.csv").exists()


# -- 6. noise is not a lattice -----------------------------------------------------------------------
def test_pure_noise_gives_no_columns_with_a_warning(tmp_path, capsys):
    noise = np.random.default_rng(5).poisson(4.0, (256, 256)).astype(np.float64)
    np.save(tmp_path / "noise.npy", noise)
    assert atoms(tmp_path / "noise.npy", tmp_path / "a.csv", "--sampling-A-per-px", "0.2") == 0
    assert "no structure above its noise" in capsys.readouterr().err
    assert (tmp_path / "a.csv").read_text().splitlines() == ["row_px,col_px,confidence,intensity,row_A,col_A"]
    # a noisy lattice (3 e/px at a column) is still found
    np.save(tmp_path / "lattice.npy", lattice((256, 256)))
    assert atoms(tmp_path / "lattice.npy", tmp_path / "b.csv", "--sampling-A-per-px", "0.2") == 0
    assert len(read_csv(tmp_path / "b.csv")["row_px"]) > 0.8 * (256 / 9.0) ** 2


def test_structure_score_separates_shot_noise_from_faint_columns():
    from stemlive.models.atom_analysis import NOISE_PEAK, structure_score

    rng = np.random.default_rng(1)
    for shape in ((8, 8), (16, 40), (64, 64), (300, 200)):
        for lam in (0.2, 3.0, 1e3):
            assert structure_score(rng.poisson(lam, shape).astype(float)) < NOISE_PEAK
        ramp = np.indices(shape)[0] * 0.5  # uneven illumination is no structure
        assert structure_score(rng.normal(5, 2, shape) + ramp) < NOISE_PEAK
    assert structure_score(np.zeros((32, 32))) == 0
    for seed in range(3):
        assert structure_score(lattice((96, 96), counts=1.0, seed=seed)) > 2 * NOISE_PEAK
