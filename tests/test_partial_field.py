"""Pixels off the recorded frame are not data: validity masks, normalisation on real pixels only
(bit-identical to before when every pixel is real), and `partial-field` instead of a guess."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from stemlive.models import canonical
from stemlive.models.pacbed_analysis import FLAGS, MIN_FIELD_ALPHA, PacbedAnalyzer, field_alpha
from stemlive.simulate.library import PacbedLibrary

from .helpers import place


def reference_normalise(x, background=0.0, window_alpha=canonical.ANALYSIS_WINDOW_ALPHA):
    """canonical.normalise as the shipped networks were trained with it (before validity masks)."""
    x = np.asarray(x, np.float32)
    m = canonical.window_mask(window_alpha)
    mean = x[..., m].mean(axis=-1)[..., None, None]
    b = np.asarray(background, np.float32)
    x = x / np.maximum(mean, 1e-12) - (b.reshape(x.shape[:-2] + (1, 1)) if b.ndim else b)
    x = np.sqrt(np.clip(x, 0, None))
    inside = x[..., m]
    mu = inside.mean(axis=-1)[..., None, None]
    sd = np.maximum(inside.std(axis=-1), 1e-6)[..., None, None]
    return np.where(m, (x - mu) / sd, 0).astype(np.float32)


def test_valid_pixels_are_those_sampled_on_the_frame():
    a = canonical.ALPHA_PX
    assert canonical.valid_pixels((300, 300), (150.0, 140.0), a, 17.0).all()
    v = canonical.valid_pixels((300, 300), (10.0, 150.0), a, 0.0)  # 10 px below the top edge
    rows = np.arange(canonical.PIXELS) - (canonical.PIXELS - 1) / 2
    assert np.array_equal(v, np.broadcast_to((rows >= -10)[:, None], v.shape))
    # θ = 90°: canonical u samples raw (150 + 2 u1, 30 − 2 u0); columns 0-39 hold −4.5 ≤ u0 ≤ 15
    v = canonical.valid_pixels((300, 40), (150.0, 30.0), 2 * a, 90.0)
    assert np.array_equal(v, np.broadcast_to(((rows >= -4.5) & (rows <= 15))[:, None], v.shape))


@pytest.mark.parametrize("window", [canonical.ALIGN_WINDOW_ALPHA, canonical.ANALYSIS_WINDOW_ALPHA])
def test_normalise_is_bit_identical_when_every_pixel_is_real(window):
    rng = np.random.default_rng(1)
    x = rng.gamma(2.0, size=(6, 64, 64)).astype(np.float32)
    b = rng.uniform(0, 0.3, 6).astype(np.float32)
    ref = reference_normalise(x, b, window)
    assert np.array_equal(canonical.normalise(x, b, window), ref)
    assert np.array_equal(canonical.normalise(x, b, window, np.ones(x.shape, bool)), ref)
    assert np.array_equal(canonical.normalise(x[0], 0.1, window), reference_normalise(x[0], 0.1, window))
    valid = np.ones(x.shape, bool)
    valid[2, :12] = False  # crops 2 and 4 run off a frame, the others are whole
    valid[4, :, 45:] = False
    got = canonical.normalise(x, b, window, valid)
    for i in (0, 1, 3, 5):
        assert np.array_equal(got[i], ref[i])
    m = canonical.window_mask(window)
    for i in (2, 4):  # standardised over the window (off-frame pixels filled), zero outside it
        assert not got[i][~m].any() and not np.array_equal(got[i], ref[i])
        assert abs(got[i][m].mean()) < 1e-5 and got[i][m].std() == pytest.approx(1, abs=1e-4)
    garbage = np.where(valid, x, rng.uniform(0, 1e6, x.shape).astype(np.float32))
    assert np.array_equal(canonical.normalise(garbage, b, window, valid), got)  # off-frame values never count


def test_off_frame_pixels_continue_the_real_ones_radially():
    c = (canonical.PIXELS - 1) / 2
    yy, xx = np.indices((canonical.PIXELS, canonical.PIXELS))
    ring = np.rint(np.hypot(yy - c, xx - c))
    y = (np.exp(-ring / 9) + 0.01 * np.sin(ring))[None].astype(np.float32)  # radially symmetric
    use = (yy > 20)[None] & canonical.window_mask(2.6)[None]  # the frame starts 11.5 px above the centre
    filled = canonical.fill_radially(np.where(use, y, 7.0).astype(np.float32), use)
    assert np.allclose(filled[0][canonical.window_mask(2.6)], y[0][canonical.window_mask(2.6)], atol=1e-6)
    one_ring = (ring <= 3)[None]  # rings without real pixels take the nearest inner ring
    got = canonical.fill_radially(y, one_ring)
    assert np.allclose(got[0][ring > 3], y[0][ring == 3][0])


@pytest.fixture(scope="module")
def library(quadrant_library):
    lib = PacbedLibrary.load(quadrant_library)
    return lib, lib.alpha_mrad / lib.mrad_per_px


def frame(library, center, shape=(96, 128), radius=14.0, seed=0):
    lib, a = library
    img = place(lib.pattern(3.0, (1.0, 0.0)), a, shape, radius, center, rotation=10.0)
    return np.random.default_rng(seed).poisson(img / img.max() * 3000).astype(np.uint16)


class Recorder:
    """A backend wrapper that keeps every input batch."""

    def __init__(self, backend):
        self.backend, self.inputs = backend, []

    def __call__(self, x):
        self.inputs.append(np.array(x))
        return self.backend(x)


def test_network_input_is_unchanged_for_whole_frames(tiny_models, library, monkeypatch):
    """Whole frames (here ±3.2 α around the disk) give the networks exactly the input they had
    before validity masks existed, on the stack and on the per-pattern path."""
    stack = np.stack([frame(library, (50.0, 60.0)), frame(library, (46.0, 64.0), seed=1)])

    def inputs(patterns):
        an = PacbedAnalyzer.for_acquisition(200, 13.6, tiny_models, backend="onnxruntime")
        an.align, an.thickness_tilt = Recorder(an.align), Recorder(an.thickness_tilt)
        an.analyze(patterns)
        return an.align.inputs + an.thickness_tilt.inputs

    now = inputs(stack) + inputs(list(stack))
    with monkeypatch.context() as m:
        m.setattr(canonical, "normalise", lambda x, b=0.0, w=canonical.ANALYSIS_WINDOW_ALPHA, valid=None:
                  reference_normalise(x, b, w))
        before = inputs(stack) + inputs(list(stack))
    assert len(now) == len(before) > 4
    for x, y in zip(now, before):
        assert np.array_equal(x, y)


def test_a_partial_field_frame_gets_its_geometry_and_no_estimate(tiny_models, library, tmp_path):
    from stemlive.live.cli import main
    from stemlive.live.store import estimate_row, flag_names

    assert "partial-field" in FLAGS
    x = frame(library, (15.0, 64.0))  # ±1.07 α to the top edge
    an = PacbedAnalyzer.for_acquisition(200, 13.6, tiny_models, backend="onnxruntime")
    assert an.min_field_alpha == MIN_FIELD_ALPHA
    est = an.analyze(x[None])[0]
    assert est.error is None and "partial-field" in est.flags and est.in_range is False
    assert np.hypot(*np.subtract(est.center_px, (20, 64))) < 6 and est.radius_px > 0
    assert field_alpha(x.shape, est.center_px, est.radius_px) < MIN_FIELD_ALPHA
    assert all(math.isnan(v) for v in (est.thickness_nm, est.thickness_sigma_nm, *est.tilt_mrad,
                                        *est.tilt_sigma_mrad, *est.tilt_crystal_mrad))
    doc = est.to_json()
    assert doc["thickness_nm"] is None and doc["tilt_mrad"] == [None, None] and doc["center_px"][0] is not None
    json.dumps(doc, allow_nan=False)
    row = estimate_row(est, partial=False)  # the live store
    assert np.isnan(row["thickness_nm"]) and np.isnan(row["tilt_mrad"]).all() and row["in_range"] == 0
    assert np.isfinite(row["center_px"]).all() and flag_names(int(row["flags"])) == ["partial-field"]
    # the CLI: exit 0 (analysed: the geometry is the answer), strict JSON
    np.save(src := tmp_path / "p.npy", x)
    rc = main(["pacbed", "analyze", str(src), "--alpha-mrad", "13.6", "--kv", "200", "--out", str(tmp_path / "o.json"),
               "--models", str(tiny_models)])
    p = json.loads((tmp_path / "o.json").read_text(), parse_constant=lambda c: pytest.fail(c))["patterns"][0]
    assert rc == 0 and p["flags"][0] == "partial-field" and p["thickness_nm"] is None
    # the rule can be switched off (how the threshold was measured)
    read = PacbedAnalyzer.for_acquisition(200, 13.6, tiny_models, backend="onnxruntime", min_field_alpha=0).analyze(x[None])[0]
    assert np.isfinite(read.thickness_nm) and "partial-field" not in read.flags


def test_whole_frames_are_not_partial(tiny_models, library):
    an = PacbedAnalyzer.for_acquisition(200, 13.6, tiny_models, backend="onnxruntime")
    for e in an.analyze(np.stack([frame(library, (50.0, 60.0)), frame(library, (40.0, 70.0), seed=2)])):
        assert e.error is None and "partial-field" not in e.flags and np.isfinite(e.thickness_nm)
