"""Synthetic 4D-STEM scans: ground truth, noise model, formats LiberTEM reads."""
import json

import h5py
import numpy as np
import pytest

from stemlive.simulate.library import PacbedLibrary
from stemlive.simulate.scan import (ScanParams, compose_frames, pack_library, terrace_edges, thickness_field,
                                    tilt_field, write_scan)

SMALL = dict(scan_shape=(24, 32), thickness_nm=(2.5, 7.5), thickness_steps=0, bowl_tilt_mrad=1.2, bowl_radius=0.25)


def test_ground_truth_fields_match_request():
    p = ScanParams(**SMALL, tilt_offset_mrad=(0.1, -0.2))
    t = thickness_field(p)
    assert t[:, 0] == pytest.approx(2.5) and t[:, -1] == pytest.approx(7.5)
    assert np.all(np.diff(t, axis=1) > 0)
    tilt = tilt_field(p)
    dev = np.linalg.norm(tilt - np.array([0.1, -0.2]), axis=-1)
    assert dev.max() == pytest.approx(1.2, rel=0.05)  # largest bowl tilt as requested
    r, c = round(0.5 * 23), round(0.4 * 31)
    assert dev[r, c] < 0.25  # flat at the bowl centre (pixel within 0.6 px of it)
    d = tilt - np.array([0.1, -0.2])
    assert d[r, c + 6, 1] > 0.5 and d[r, c - 6, 1] < -0.5  # radial, pointing away from the centre
    assert d[r + 6, c, 0] > 0.5 and abs(d[r + 6, c, 1]) < 0.15
    stepped = thickness_field(ScanParams(**dict(SMALL, thickness_steps=3, terrace_jitter=0.0)))
    assert len(np.unique(stepped)) == 3


def test_terraces_are_irregular_and_sit_on_library_planes():
    """A FIB wedge: n flat terraces, edges moved by up to ±jitter/2 of the mean width, levels on
    the library's exit planes; the same specimen for any noise seed's dose."""
    p = ScanParams(scan_shape=(8, 240), thickness_nm=(10.0, 55.0), thickness_steps=12, terrace_jitter=0.4)
    edges = terrace_edges(p)
    regular = np.arange(1, 12) * 20.0
    assert len(edges) == 11 and np.all(np.diff(edges) > 0)
    assert np.all(np.abs(edges - regular) <= 0.2 * 20 + 1e-9) and np.abs(edges - regular).max() > 1.0
    planes = 7.81 + 3.905 * np.arange(13)
    t = thickness_field(p, planes)
    levels = np.unique(t)
    assert len(levels) == 12 and np.all(np.isin(levels, planes))
    assert np.all(np.diff(t[0]) >= 0) and (t == t[:1]).all()  # steps up along axis 1 only
    widths = np.diff(np.flatnonzero(np.diff(t[0])))
    assert widths.min() >= 20 * 0.6 - 1 and widths.max() <= 20 * 1.4 + 1 and widths.std() > 1
    other_dose = ScanParams(**{**p.__dict__, "dose": 1e3})
    assert np.array_equal(thickness_field(p, planes), thickness_field(other_dose, planes))
    with pytest.raises(ValueError, match="terrace_jitter"):
        thickness_field(ScanParams(thickness_steps=4, terrace_jitter=1.0))


def test_terrace_frames_are_library_patterns(position_library):
    """On a terrace the frames are the library's CBEDs at that plane, not a blend of two."""
    lib = PacbedLibrary.load(position_library, positions=True)
    p = ScanParams(**dict(SMALL, thickness_steps=3, terrace_jitter=0.3, bowl_tilt_mrad=0.0), dose=1e6,
                   psf_sigma_px=0.0, inelastic_mfp_nm=1e9, dtype="uint32")
    t = thickness_field(p, lib.thickness_nm)
    assert np.all(np.isin(np.unique(t), lib.thickness_nm))
    frames = compose_frames(lib, p, progress=False)
    ref = lib.positions_for_tilt(lib.tilt_index((0.0, 0.0)))
    for c in (0, 15, 31):
        it = int(np.flatnonzero(lib.thickness_nm == t[0, c])[0])
        mu = ref[it, 0, c % 8] * p.dose
        assert np.mean((frames[0, c] - mu) ** 2 / np.maximum(mu, 1.0)) < 1.5  # only Poisson noise


def test_thickness_outside_library_is_refused(position_library):
    lib = PacbedLibrary.load(position_library, positions=True)
    with pytest.raises(ValueError, match="thickness field spans"):
        compose_frames(lib, ScanParams(**dict(SMALL, thickness_nm=(2.5, 50.0))), progress=False)


def test_packed_library_reads_the_same_within_its_rounding(position_library, tmp_path):
    """The shippable copy: PacbedLibrary reads it unchanged, every value within 5 significant bits
    (below float16's normal range, 6e-5 of the probe, within half its step of 2^-18)."""
    out = pack_library(position_library, tmp_path / "packed.h5")
    a = PacbedLibrary.load(position_library, positions=True)
    b = PacbedLibrary.load(out, positions=True)
    assert out.stat().st_size < position_library.stat().st_size
    np.testing.assert_array_equal(a.patterns, b.patterns)
    np.testing.assert_array_equal(a.tilt_mrad, b.tilt_mrad)
    assert a.attrs["params"] == b.attrs["params"] and b.attrs["position_patterns_significant_bits"] == 5
    x, y = a.position_patterns.astype(np.float32), b.position_patterns.astype(np.float32)
    assert np.all(np.abs(y - x) <= 2.0 ** -5 * np.abs(x) + 2.0 ** -19)
    with pytest.raises(ValueError, match="beside its input"):
        pack_library(out, out)


def test_frames_follow_the_library(position_library):
    lib = PacbedLibrary.load(position_library, positions=True)
    p = ScanParams(**dict(SMALL, bowl_tilt_mrad=0.0), dose=1e6, psf_sigma_px=0.0, inelastic_mfp_nm=1e9,
                   dtype="uint32")
    frames = compose_frames(lib, p, progress=False)
    assert frames.shape == (24, 32, 21, 21) and frames.dtype == np.uint32
    # at a library thickness and tilt (0, 0), each frame is the library CBED at its position
    col = int(np.argmin(np.abs(thickness_field(p)[0] - lib.thickness_nm[1])))
    t = thickness_field(p)[0, col]
    assert abs(t - lib.thickness_nm[1]) < 0.2
    i0 = lib.tilt_index((0.0, 0.0))
    ref = lib.positions_for_tilt(i0)
    i = int(np.searchsorted(lib.thickness_nm, t, side="right") - 1)
    w = (t - lib.thickness_nm[i]) / (lib.thickness_nm[i + 1] - lib.thickness_nm[i])
    expect = (1 - w) * ref[i] + w * ref[i + 1]
    def chi2(counts, cbed):
        mu = cbed * p.dose
        return float(np.mean((counts - mu) ** 2 / np.maximum(mu, 1.0)))

    for r in (0, 3, 9):
        assert chi2(frames[r, col], expect[r % 8, col % 8]) < 1.5  # only Poisson noise
        assert chi2(frames[r, col], expect[(r + 4) % 8, col % 8]) > 5  # another probe position is not
    # PACBED over whole unit cells is the library PACBED
    block = frames[:8, col - col % 8: col - col % 8 + 8].mean(axis=(0, 1)) / p.dose
    assert np.abs(block - expect.mean(axis=(0, 1))).sum() / block.sum() < 0.15


def test_dose_background_and_seed(position_library):
    lib = PacbedLibrary.load(position_library, positions=True)
    a = compose_frames(lib, ScanParams(**SMALL, dose=2e4), progress=False)
    b = compose_frames(lib, ScanParams(**SMALL, dose=2e4), progress=False)
    c = compose_frames(lib, ScanParams(**SMALL, dose=2e4, seed=1), progress=False)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # counts ≈ dose x fraction of the probe on the detector
    assert a.sum(axis=(-1, -2)).mean() == pytest.approx(2e4 * lib.patterns[0, 0].sum(), rel=0.1)
    # inelastic background: thick frames carry more intensity far from the disk than without it
    kw = dict(SMALL, dose=1e6, seed=2, dtype="uint32", psf_sigma_px=0.0)
    no_bg = compose_frames(lib, ScanParams(**kw, inelastic_mfp_nm=1e9), progress=False).astype(float)
    bg = compose_frames(lib, ScanParams(**kw, inelastic_mfp_nm=20.0), progress=False).astype(float)
    k = np.hypot(*np.meshgrid(np.arange(21) - 10, np.arange(21) - 10, indexing="ij"))
    ring = (k > 5) & (k < 8)  # 30-49 mrad, outside the zero disk (6.1 mrad/px)
    thick, thin = bg[:, -4:], bg[:, :4]
    gain_thick = thick[..., ring].sum() / no_bg[:, -4:][..., ring].sum()
    gain_thin = thin[..., ring].sum() / no_bg[:, :4][..., ring].sum()
    assert gain_thick > gain_thin > 1.0  # background grows with thickness
    assert bg.sum() == pytest.approx(no_bg.sum(), rel=0.01)  # redistributed, not added


def test_saturation_is_counted_and_warned(position_library):
    lib = PacbedLibrary.load(position_library, positions=True)
    with pytest.warns(UserWarning, match="saturated"):
        frames = compose_frames(lib, ScanParams(**SMALL, dose=2e6, dtype="uint16"), progress=False)
    assert frames.max() == 65535


def test_tilt_outside_library_is_refused(position_library):
    lib = PacbedLibrary.load(position_library, positions=True)
    with pytest.raises(ValueError, match="beyond the library"):
        compose_frames(lib, ScanParams(**dict(SMALL, bowl_tilt_mrad=5.0)), progress=False)


def test_written_scan_reads_in_libertem(position_library, tmp_path):
    import libertem.api as lt
    from libertem.udf.sum import SumUDF

    out = write_scan(position_library, ScanParams(**SMALL), tmp_path / "scan", progress=False)
    meta = json.loads((out / "params.json").read_text())
    assert meta["scan_shape"] == [24, 32] and meta["frame_shape"] == [21, 21]
    frames = np.load(out / "frames.npy")
    with h5py.File(out / "truth.h5") as f:
        assert f["thickness_nm"].shape == (24, 32) and f["tilt_mrad"].shape == (24, 32, 2)
        cols = f["columns/position_px"][()]
        species = [s.decode() for s in f["columns/species"][()]]
    sr = cols[np.array(species) == "Sr"]
    assert np.allclose(sr % 8, 0)  # Sr on the mirror origin, 8 scan steps per unit cell
    assert len(sr) == 3 * 4  # 24/8 x 32/8 inside the field
    with lt.Context.make_with("inline") as ctx:
        for ds in (ctx.load("npy", path=str(out / "frames.npy")),
                   ctx.load("hdf5", path=str(out / "frames.h5"), ds_path="data")):
            res = ctx.run_udf(ds, SumUDF())
            assert np.allclose(res["intensity"].data, frames.sum(axis=(0, 1)))


def test_scan_cli_round_trip(position_library, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cli-scan"
    res = subprocess.run([sys.executable, "-m", "stemlive.live.cli", "simulate", "scan", "--library",
                          str(position_library), "--out", str(out), "--scan-shape", "16", "24", "--thickness",
                          "3", "6", "--bowl-tilt", "1.0", "--format", "npy"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["files"] == ["frames.npy", "overview.png", "params.json", "truth.h5"]
    assert np.load(out / "frames.npy").shape == (16, 24, 21, 21)


def test_stride_and_frame_size(position_library, tmp_path):
    out = write_scan(position_library, ScanParams(**SMALL, stride=2, frame_pixels=15), tmp_path / "s",
                     formats=("npy",), progress=False)
    frames = np.load(out / "frames.npy")
    meta = json.loads((out / "params.json").read_text())
    assert frames.shape == (24, 32, 15, 15)
    assert meta["mrad_per_px"] == pytest.approx(2 * 4.5 * 13.6 / 14)
    assert meta["scan_step_nm"] == pytest.approx(0.3905 / 4)
    with h5py.File(out / "truth.h5") as f:
        cols = f["columns/position_px"][()]
        species = [s.decode() for s in f["columns/species"][()]]
    sr = cols[np.array(species) == "Sr"]
    assert np.allclose(sr % 4, 0) and len(sr) == 6 * 8  # 4 scan steps per cell now
    with pytest.raises(ValueError, match="must divide"):
        compose_frames(PacbedLibrary.load(position_library, positions=True), ScanParams(**SMALL, stride=3),
                       progress=False)
