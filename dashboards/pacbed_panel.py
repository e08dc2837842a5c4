"""The PACBED panel: one block's mean pattern on log or gamma intensity, axes in mrad from the
fitted disk centre, the fitted disk and the virtual detectors' rings drawn over it; beside it
the library check's best-fitting pattern at the block's checked thickness and tilt and the
difference (block − library), both in the check's canonical frame (crystal axes along the
plot's axes, mrad from the disk centre), or, where there is no check, why not in words.

A linear display clipped at a high percentile shows the zero disk only; thickness and tilt are
read from the faint structure around it, so the panel opens on a log scale.
"""
from __future__ import annotations

import math

import numpy as np
from bokeh.layouts import column, row
from bokeh.models import (Button, ColorBar, ColumnDataSource, Div, LabelSet, LinearColorMapper,
                          RadioButtonGroup, Range1d, Slider)
from bokeh.plotting import figure

from .display import DIVERGING, SEQUENTIAL, flag_text

SCALES = ("linear", "log", "gamma")
FIT_AXES = "{unit}, [010] → [100] ↓"  # the check's canonical frame, from the disk centre


def display_intensity(pac: np.ndarray, scale: str, gamma: float = 0.3) -> np.ndarray:
    """The pattern as drawn: linear, log10 above a floor, or (I - min)^γ normalised to [0, 1]."""
    if scale not in SCALES:
        raise ValueError(f"unknown intensity scale {scale!r}; use one of {SCALES}")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    p = np.asarray(pac, np.float64)
    finite = p[np.isfinite(p)]
    if finite.size == 0 or scale == "linear":
        return p
    lo, hi = float(finite.min()), float(finite.max())
    if scale == "log":
        # floor: a thousandth of the brightest pixel above the minimum (Poisson zeros stay drawable)
        floor = max((hi - lo) * 1e-3, 1e-12)
        return np.log10(p - lo + floor)
    return np.clip((p - lo) / max(hi - lo, 1e-12), 0, 1) ** gamma


def calibration(meta: dict, estimate: dict) -> tuple[float | None, str]:
    """mrad per detector pixel: the store's calibration, else α over the fitted disk radius."""
    mpp = meta.get("mrad_per_px")
    if mpp is not None and math.isfinite(float(mpp)) and float(mpp) > 0:
        return float(mpp), "the detector calibration"
    r, alpha = estimate.get("radius_px"), meta.get("alpha_mrad")
    if r is not None and alpha and math.isfinite(float(r)) and float(r) > 0:
        return float(alpha) / float(r), "α over the fitted disk radius"
    return None, ""


def ring_radii(rings: dict, alpha_mrad: float | None) -> list[tuple[str, float, float]]:
    """(name, inner, outer) in mrad of the virtual detectors (radii in units of α or mrad)."""
    out = []
    for name, spec in (rings or {}).items():
        inner, outer, unit = spec
        scale = 1.0 if unit == "mrad" else alpha_mrad
        if unit not in ("mrad", "alpha"):
            raise ValueError(f"ring {name!r}: unit {unit!r}, expected 'alpha' or 'mrad'")
        if scale:
            out.append((name, float(inner) * scale, float(outer) * scale))
    return out


def block_title(block: tuple[int, int] | None, pinned: bool) -> str:
    if block is None:
        return "PACBED — waiting for the first analysed block"
    i, j = block
    return f"PACBED — pinned to block ({i}, {j})" if pinned else f"PACBED — following the latest block ({i}, {j})"


class PacbedPanel:
    """The figure, its display controls and what is drawn for the block shown."""

    def __init__(self, size: int, on_follow):
        self.mapper = LinearColorMapper(palette=SEQUENTIAL)
        self.image = ColumnDataSource({"image": [], "x": [], "y": [], "dw": [], "dh": []}, name="source-pacbed")
        self.disk = ColumnDataSource({"x": [], "y": [], "r": []}, name="source-pacbed-disk")
        self.rings = ColumnDataSource({"x": [], "y": [], "r": [], "name": [], "lx": [], "ly": []},
                                      name="source-pacbed-rings")
        p = figure(title=block_title(None, False), frame_width=size, frame_height=size, match_aspect=True,
                   tools="pan,wheel_zoom,reset,save", name="pacbed", x_axis_label="mrad (axis 1)",
                   y_axis_label="mrad (axis 0)", x_range=Range1d(-1, 1), y_range=Range1d(1, -1))
        p.image(image="image", x="x", y="y", dw="dw", dh="dh", source=self.image, color_mapper=self.mapper)
        p.grid.visible = False  # hidden by the image, read on every repaint
        p.circle(x="x", y="y", radius="r", source=self.rings, fill_alpha=0, line_color="white",
                 line_dash="dashed", line_alpha=0.8, name="rings")
        p.add_layout(LabelSet(x="lx", y="ly", text="name", source=self.rings, text_color="white",
                              text_font_size="9px", x_offset=2))
        p.circle(x="x", y="y", radius="r", source=self.disk, fill_alpha=0, line_color="red", line_width=2,
                 name="disk")
        p.scatter(x="x", y="y", source=self.disk, marker="cross", size=12, color="red")
        p.add_layout(ColorBar(color_mapper=self.mapper, width=8), "right")
        self.figure = p
        self.scale = RadioButtonGroup(labels=list(SCALES), active=1, name="pacbed-scale")
        self.gamma = Slider(title="γ", start=0.1, end=1.0, step=0.05, value=0.3, width=140, name="pacbed-gamma")
        # the library check's fit beside it: its model on the same intensity scale, the difference
        small = max(100, size // 2 - 25)  # (the page stays within a 1750 px window)
        self.fit_mapper = LinearColorMapper(palette=SEQUENTIAL, nan_color=(0, 0, 0, 0))
        self.diff_mapper = LinearColorMapper(palette=DIVERGING, nan_color=(0, 0, 0, 0))
        self.fit_image = ColumnDataSource({"image": [], "x": [], "y": [], "dw": [], "dh": []}, name="source-pacbed-fit")
        self.diff_image = ColumnDataSource({"image": [], "x": [], "y": [], "dw": [], "dh": []},
                                           name="source-pacbed-difference")
        self.fit_figures = []
        for name, title, src, mapper in (("pacbed-fit", "Library fit", self.fit_image, self.fit_mapper),
                                         ("pacbed-difference", "Block − library", self.diff_image, self.diff_mapper)):
            # one axis label for both axes, no toolbar: the panel fits beside the pattern
            f = figure(title=title, frame_width=small, frame_height=small, match_aspect=True, name=name,
                       tools="", toolbar_location=None, x_axis_label=FIT_AXES.format(unit="mrad"),
                       x_range=Range1d(-1, 1), y_range=Range1d(1, -1))
            f.image(image="image", x="x", y="y", dw="dw", dh="dh", source=src, color_mapper=mapper)
            f.grid.visible = False
            f.xaxis.major_label_text_font_size = f.yaxis.major_label_text_font_size = "8px"
            f.xaxis.axis_label_text_font_size = "9px"
            f.xaxis.ticker.desired_num_ticks = f.yaxis.ticker.desired_num_ticks = 4
            if mapper is self.diff_mapper:  # the difference's scale matters; the fit's is the pattern's
                f.add_layout(ColorBar(color_mapper=mapper, width=6, label_standoff=3,
                                      major_label_text_font_size="8px"), "right")
            self.fit_figures.append(f)
        # both show the same part of the canonical frame
        self.fit_figures[1].x_range = self.fit_figures[0].x_range
        self.fit_figures[1].y_range = self.fit_figures[0].y_range
        self.fit_info = Div(text="<i>library fit: waiting for a block</i>", width=small + 60, name="pacbed-fit-info")
        self._fit: dict | None = None
        self.follow = Button(label="follow latest", name="pacbed-follow", width=110, disabled=True)
        self.follow.on_click(on_follow)
        self.info = Div(text="", width=size + 60, name="pacbed-info")
        self.scale.on_change("active", lambda attr, old, new: self.redraw())
        self.gamma.on_change("value_throttled", lambda attr, old, new: self.redraw())
        self._pattern: np.ndarray | None = None
        self._centre: tuple[float, float] | None = None
        self._mpp: float | None = None

    def layout(self):
        return column(row(self.figure, column(*self.fit_figures, self.fit_info)),
                      row(self.scale, self.gamma, self.follow), self.info)

    def show(self, block: tuple[int, int], pinned: bool, header: dict, pac: np.ndarray, text: str) -> None:
        """Draw block ``block``'s pattern with its fitted disk and the virtual detectors."""
        meta, est = header.get("meta", {}), header.get("estimate", {})
        h, w = pac.shape
        c = est.get("center_px")
        ok = c is not None and all(v is not None and math.isfinite(v) for v in c)
        centre = (float(c[0]), float(c[1])) if ok else ((h - 1) / 2, (w - 1) / 2)
        mpp, source = calibration(meta, est)
        scale = mpp or 1.0
        unit = "mrad" if mpp else "px"
        self.figure.xaxis.axis_label = f"{unit} (detector axis 1)"
        self.figure.yaxis.axis_label = f"{unit} (detector axis 0)"
        self._pattern, self._centre, self._mpp = np.asarray(pac, np.float64), centre, scale
        self._fit = self._fit_of(header, meta)
        self.redraw()
        half = max(h, w) / 2 * scale
        x0 = (w - 1) / 2 * scale - centre[1] * scale
        y0 = (h - 1) / 2 * scale - centre[0] * scale
        self.figure.x_range.update(start=x0 - half, end=x0 + half)
        self.figure.y_range.update(start=y0 + half, end=y0 - half)  # axis 0 downwards, as stored
        r = est.get("radius_px")
        if ok and r is not None and math.isfinite(r):
            self.disk.data = {"x": [0.0], "y": [0.0], "r": [float(r) * scale]}
        else:
            self.disk.data = {"x": [], "y": [], "r": []}
        rings = ring_radii(meta.get("rings", {}), meta.get("alpha_mrad")) if mpp else []
        # each ring edge drawn once, named at its outer edge ("bf" out to 0.5 α, "abf" 0.5-1 α, ...)
        edges: dict[float, str] = {}
        for name, inner, outer in rings:
            edges[round(outer, 6)] = name.upper()
            if inner > 0:
                edges.setdefault(round(inner, 6), "")
        radii = sorted(edges.items())
        self.rings.data = {"x": [0.0] * len(radii), "y": [0.0] * len(radii), "r": [v for v, _ in radii],
                           "name": [n for _, n in radii], "lx": [v * 0.7071 for v, _ in radii],
                           "ly": [-v * 0.7071 for v, _ in radii]}
        self.figure.title.text = block_title(block, pinned)
        self.follow.disabled = not pinned
        calib = f" Axes: {unit}" + (f" ({scale:.3g} mrad/px from {source})." if mpp else ".")
        self.info.text = text + calib

    def _fit_of(self, header: dict, meta: dict) -> dict | None:
        """The library fit that came with the block (None: the reason is shown instead)."""
        fit, images = header.get("fit") or {}, header.get("fit_images") or {}
        if not fit.get("available") or "model" not in images:
            reason = fit.get("reason") or "the engine sent no library fit with this block"
            self.fit_info.text = f"<b>No library fit</b>: {reason}."
            empty = {"image": [], "x": [], "y": [], "dw": [], "dh": []}
            self.fit_image.data, self.diff_image.data = empty, dict(empty)
            return None
        alpha = meta.get("alpha_mrad")
        ok = alpha is not None and math.isfinite(float(alpha)) and float(alpha) > 0
        s = float(alpha) / float(fit["alpha_px"]) if ok else 1.0  # mrad per canonical pixel
        unit = "mrad" if ok else "canonical px"
        model = np.asarray(images["model"], np.float64)
        n = model.shape[0]
        half = (n - 1) / 2
        tc = fit.get("tilt_crystal_mrad") or [math.nan, math.nan]
        self.fit_info.text = (f"<b>Library fit</b> at thickness {fit['thickness_nm']:.1f} nm, tilt [100] "
                              f"{tc[0]:+.2f}, [010] {tc[1]:+.2f} mrad (crystal frame); unexplained structure "
                              f"beyond the disk {fit['fit_quality']:.3f}. Axes: {unit} from the disk centre.")
        for f in self.fit_figures:
            f.xaxis.axis_label = FIT_AXES.format(unit=unit)
        self.fit_figures[0].x_range.update(start=-(half + 0.5) * s, end=(half + 0.5) * s)
        self.fit_figures[0].y_range.update(start=(half + 0.5) * s, end=-(half + 0.5) * s)
        return {"model": model, "residual": np.asarray(images["residual"], np.float64), "s": s, "half": half}

    def redraw(self) -> None:
        """The same pattern (and library fit) on the chosen intensity scale."""
        if self._pattern is None:
            return
        if self._fit is not None:
            f = self._fit
            box = {"x": [(-f["half"] - 0.5) * f["s"]], "y": [(-f["half"] - 0.5) * f["s"]],
                   "dw": [f["model"].shape[1] * f["s"]], "dh": [f["model"].shape[0] * f["s"]]}
            model = display_intensity(f["model"], SCALES[self.scale.active], float(self.gamma.value))
            self.fit_image.data = {"image": [model], **box}
            self.diff_image.data = {"image": [f["residual"]], **box}
            finite = model[np.isfinite(model)]
            if finite.size:
                lo, hi = float(finite.min()), float(finite.max())
                self.fit_mapper.update(low=lo, high=hi if hi > lo else lo + 1)
            r = f["residual"][np.isfinite(f["residual"])]
            m = float(np.max(np.abs(r))) if r.size else 1.0
            self.diff_mapper.update(low=-(m or 1.0), high=m or 1.0)
        pac, (cr, cc), s = self._pattern, self._centre, self._mpp
        shown = display_intensity(pac, SCALES[self.scale.active], float(self.gamma.value))
        h, w = shown.shape
        self.image.data = {"image": [shown], "x": [(-0.5 - cc) * s], "y": [(-0.5 - cr) * s],
                           "dw": [w * s], "dh": [h * s]}
        finite = shown[np.isfinite(shown)]
        if finite.size:
            lo, hi = float(finite.min()), float(finite.max())
            self.mapper.update(low=lo, high=hi if hi > lo else lo + 1)


def block_text(i: int, j: int, header: dict, flag_names: list[str] = ()) -> str:
    est = header.get("estimate", {})
    if not header.get("done"):
        return f"<b>block ({i}, {j})</b>: not analysed yet ({header.get('frames', 0)} frames so far)."

    def num(v, fmt="{:.1f}"):
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    t, ts = est.get("thickness_nm"), est.get("thickness_sigma_nm")
    tilt, tsig = est.get("tilt_mrad") or [None, None], est.get("tilt_sigma_mrad") or [None, None]
    flags = flag_text(est.get("flags", 0) or 0, list(flag_names)) if flag_names else ""
    method = {1: "networks", 2: "library check"}.get(est.get("method"), "")
    return (f"<b>block ({i}, {j})</b>, {header.get('frames')} frames"
            + (f", read by the {method}" if method else "") + ": "
            f"<span class='thickness'>thickness {num(t)} ± {num(ts)} nm</span>; "
            f"tilt t0 {num(tilt[0], '{:+.2f}')} ± {num(tsig[0], '{:.2f}')}, "
            f"t1 {num(tilt[1], '{:+.2f}')} ± {num(tsig[1], '{:.2f}')} mrad"
            + (f"; flags: {flags}" if flags else "") + ".")
