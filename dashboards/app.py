"""The operator's page: maps on the block grid, virtual images, the PACBED of a block, status.

One `Page` per browser session; all sessions read the same feed (one per server process).  A
10 Hz callback per session draws what changed since that session last drew -- only the changed
block rows go out, as `ColumnDataSource.patch` -- so a slow browser gets fewer, larger updates
instead of a backlog.  Colour ranges, the theme and the map download act in the browser.
Atomic columns found so far are drawn over the virtual images; new ones are streamed.
"""
from __future__ import annotations

import math
import time

import numpy as np
from bokeh.events import SelectionGeometry, Tap
from bokeh.layouts import column, gridplot, row
from bokeh.models import (Button, CheckboxGroup, ColorBar, ColumnDataSource, CustomJS, Div, HoverTool,
                          LinearColorMapper, RadioButtonGroup, Range1d, Select, Spinner)
from bokeh.palettes import Cividis256, RdBu11, Viridis256
from bokeh.plotting import figure

TRANSPARENT = (0, 0, 0, 0)
MAP_SIZE = 290
REFRESH_MS = 100
MAX_DISPLAY = 512  # maps with more blocks per side are block-averaged on the server for display


def derived_maps(maps: dict) -> dict[str, np.ndarray]:
    """The maps the page shows, from the store's fields (DESIGN.md conventions)."""
    tilt, crystal = maps["tilt_mrad"], maps["tilt_crystal_mrad"]
    return {
        "thickness": maps["thickness_nm"], "thickness_sigma": maps["thickness_sigma_nm"],
        "tilt0": tilt[..., 0], "tilt1": tilt[..., 1],
        "tilt0_sigma": maps["tilt_sigma_mrad"][..., 0], "tilt1_sigma": maps["tilt_sigma_mrad"][..., 1],
        "tilt100": crystal[..., 0], "tilt010": crystal[..., 1],
        "tilt_magnitude": np.hypot(tilt[..., 0], tilt[..., 1]),
        # azimuth: degrees from axis 1 towards axis 0 (DESIGN.md)
        "tilt_azimuth": np.degrees(np.arctan2(tilt[..., 0], tilt[..., 1])),
        "out_of_range": np.where(maps["in_range"] < 0, np.nan, (maps["in_range"] == 0) * 1.0),
        "flags": np.where(maps["in_range"] < 0, np.nan, maps["flags"].astype(np.float64)),
    }


MAPS = [  # (key, title, unit, sigma key, palette, symmetric)
    ("thickness", "Thickness", "nm", "thickness_sigma", Viridis256, False),
    ("thickness_sigma", "Thickness σ", "nm", None, Cividis256, False),
    ("tilt0", "Tilt t0, detector axis 0", "mrad", "tilt0_sigma", RdBu11, True),
    ("tilt1", "Tilt t1, detector axis 1", "mrad", "tilt1_sigma", RdBu11, True),
    ("tilt100", "Tilt [100], crystal", "mrad", None, RdBu11, True),
    ("tilt010", "Tilt [010], crystal", "mrad", None, RdBu11, True),
    ("tilt_magnitude", "|Tilt|", "mrad", None, Viridis256, False),
    ("tilt_azimuth", "Tilt azimuth, axis 1 → 0", "deg", None, Viridis256, False),
    ("out_of_range", "Outside the model's range (1)", "", None, ["#dddddd", "#d62728"], False),
    ("flags", "Flags (bits, hover)", "", None, Viridis256, False),
]
VIRTUAL = [("bf", "BF"), ("abf", "ABF"), ("adf", "ADF"), ("haadf", "HAADF")]


def display_factor(shape: tuple[int, int]) -> int:
    return max(1, math.ceil(max(shape) / MAX_DISPLAY))


def downsample(values: np.ndarray, f: int) -> np.ndarray:
    """Block-average by ``f`` for display (NaN-aware; unscanned stays NaN)."""
    if f == 1:
        return values
    ny, nx = values.shape
    pad = np.full((-(-ny // f) * f, -(-nx // f) * f), np.nan)
    pad[:ny, :nx] = values
    with np.errstate(invalid="ignore"):
        blocks = pad.reshape(pad.shape[0] // f, f, pad.shape[1] // f, f)
        return np.nanmean(blocks, axis=(1, 3))


FIXED_RANGES = {"out_of_range": (0.0, 1.0)}


def auto_range(values: np.ndarray, symmetric: bool, key: str | None = None) -> tuple[float, float]:
    if key in FIXED_RANGES:
        return FIXED_RANGES[key]
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return (-1.0, 1.0) if symmetric else (0.0, 1.0)
    if symmetric:
        m = float(np.max(np.abs(finite))) or 1.0
        return -m, m
    lo, hi = float(finite.min()), float(finite.max())
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def crystal_correction(tilt_crystal_mean: np.ndarray) -> str:
    """What brings the region onto the zone axis: the beam tilted by minus the mean crystal tilt."""
    t100, t010 = tilt_crystal_mean
    return (f"mean tilt [100] {t100:+.2f}, [010] {t010:+.2f} mrad (|{math.hypot(t100, t010):.2f}| mrad) — "
            f"to reach the zone axis tilt the beam (or specimen, opposite sign) by [100] {-t100:+.2f}, "
            f"[010] {-t010:+.2f} mrad")


class Page:
    def __init__(self, doc, feed):
        self.doc, self.feed = doc, feed
        self.version = 0
        self.built = False
        self.chosen: tuple[int, int] | None = None
        self.status = Div(text="<b>waiting for the engine…</b>", sizing_mode="stretch_width", name="status")
        # the publish time of the newest block drawn; the browser notes when it arrives (latency benchmark)
        # flow control: the browser acknowledges each update once it has applied it; the server
        # sends the next only then, so a slow browser gets fewer, larger updates, never a backlog
        self.probe = Div(text="", visible=False, name="latency-probe")
        self.ack = Div(text="0", visible=False, name="ack")
        self.probe.js_on_change("text", CustomJS(args=dict(probe=self.probe, ack=self.ack), code="""
            const [sent, version] = probe.text.split(" ");
            const s = parseFloat(sent);
            if (!Number.isNaN(s)) { (window.stemliveDelays = window.stemliveDelays || []).push(Date.now() / 1000 - s); }
            requestAnimationFrame(() => { ack.text = version; });  // after the maps are drawn
        """))
        self.sent_version = 0
        self.sent_at = 0.0
        self.browser_delay_s: float | None = None  # engine publish -> this browser applied it
        self._sent_stamps: dict[int, float] = {}
        self.ack.on_change("text", self._on_ack)
        self.root = column(self.status, self.probe, self.ack, sizing_mode="stretch_width")
        doc.add_root(self.root)
        doc.title = "stemlive"
        doc.add_periodic_callback(self._refresh, REFRESH_MS)
        self._refresh()

    # -- layout (once the first state has arrived) ---------------------------------------------
    def _build(self, snap) -> None:
        sy, sx = snap.scan_shape
        self.block = snap.block_shape
        self.factor = display_factor(snap.done.shape)
        self.x_range, self.y_range = Range1d(0, sx), Range1d(sy, 0)  # row 0 at the top; pan/zoom linked
        self.maps, self.virtual = {}, {}
        derived = derived_maps(snap.maps)
        figs = [self._image_figure(key, title, unit, derived[key], derived.get(sig) if sig else None,
                                   palette, sym, self.maps, (sx, sy))
                for key, title, unit, sig, palette, sym in MAPS]
        vf = display_factor(snap.scan_shape)
        vfigs = [self._image_figure(key, title, "counts", snap.virtual[key], None, Viridis256, False, self.virtual,
                                    (sx, sy), factor=vf)
                 for key, title in VIRTUAL if key in snap.virtual]
        # atomic columns over the virtual images (pixel (r, c) covers [c, c+1) × [r, r+1): centre + 0.5)
        self.atom_source = ColumnDataSource(atom_columns(snap.atoms), name="source-atoms")
        self.atoms_shown = len(snap.atoms["positions"])
        self.atom_renderers = [f.scatter(x="x", y="y", source=self.atom_source, marker="circle", size=5,
                                         fill_alpha=0, line_color="red", line_width=1.2, name="atoms")
                               for f in vfigs]
        for f in figs + vfigs:
            f.on_event(Tap, self._on_tap)
            f.on_event(SelectionGeometry, self._on_select)
        # the chosen block's PACBED, fetched on demand from the engine
        self.pacbed_source = ColumnDataSource({"image": [], "dw": [], "dh": []})
        self.circle_source = ColumnDataSource({"x": [], "y": [], "r": []})
        self.pacbed_mapper = LinearColorMapper(palette=Viridis256)
        p = figure(title="PACBED (latest block; click a map for another)", width=MAP_SIZE + 40,
                   height=MAP_SIZE + 40, match_aspect=True, tools="pan,wheel_zoom,reset,save", name="pacbed")
        p.image(image="image", x=0, y=0, dw="dw", dh="dh", source=self.pacbed_source, color_mapper=self.pacbed_mapper)
        p.circle(x="x", y="y", radius="r", source=self.circle_source, fill_alpha=0, line_color="red", line_width=2)
        p.scatter(x="x", y="y", source=self.circle_source, marker="cross", size=14, color="red")
        self.pacbed_fig = p
        self.pacbed_info = Div(text="", width=MAP_SIZE + 40, name="pacbed-info")
        self.region_info = Div(text="<i>box-select a region on a map: its mean tilt and the correction</i>",
                               width=MAP_SIZE + 40, name="region-info")
        self.hist_source = ColumnDataSource({"left": [], "right": [], "top": []})
        self.hist_map = Select(title="histogram of", value="thickness", options=[(m[0], m[1]) for m in MAPS],
                               width=MAP_SIZE)
        self.hist_map.on_change("value", lambda attr, old, new: self._histogram())
        h = figure(title="histogram", width=MAP_SIZE + 40, height=180, tools="", name="histogram")
        h.quad(left="left", right="right", top="top", bottom=0, source=self.hist_source)
        self.hist_fig = h
        controls = self._controls()
        self.models = Div(text=("models: " + ", ".join(snap.meta.get("models", [])) +
                                f" — store: {snap.meta.get('store', '')}"), name="models", sizing_mode="stretch_width")
        side = column(self.pacbed_fig, self.pacbed_info, self.region_info, self.hist_map, self.hist_fig, controls)
        self.root.children = [
            self.status, self.probe, self.ack, self.models,
            row(gridplot(figs, ncols=4, toolbar_location="right"), side),
            Div(text="<b>Virtual detectors</b> (scan grid)"),
            gridplot(vfigs, ncols=4, toolbar_location="right") if vfigs else Div()]
        self.built = True
        self._histogram(derived)

    def _image_figure(self, key, title, unit, values, sigma, palette, symmetric, registry, extent, factor=None):
        sx, sy = extent
        factor = self.factor if factor is None else factor
        mapper = LinearColorMapper(palette=palette, nan_color=TRANSPARENT)  # unscanned: transparent
        shown = downsample(np.asarray(values, np.float64), factor)
        mapper.low, mapper.high = auto_range(shown, symmetric, key)
        data = {"image": [shown]}
        tooltips = [("scan", "($x{0}, $y{0}) px"), (title, f"@image{{0.00}} {unit}")]
        if sigma is not None:
            data["sigma"] = [downsample(np.asarray(sigma, np.float64), factor)]
            tooltips.append(("σ", f"@sigma{{0.00}} {unit}"))
        source = ColumnDataSource(data, name=f"source-{key}")
        f = figure(title=f"{title}" + (f" [{unit}]" if unit else ""), width=MAP_SIZE, height=MAP_SIZE,
                   x_range=self.x_range, y_range=self.y_range, name=f"map-{key}",
                   tools="pan,wheel_zoom,box_zoom,box_select,tap,reset,save")
        f.image(image="image", x=0, y=0, dw=sx, dh=sy, source=source, color_mapper=mapper)
        f.add_tools(HoverTool(tooltips=tooltips))
        f.add_layout(ColorBar(color_mapper=mapper, width=8), "right")
        registry[key] = {"source": source, "mapper": mapper, "symmetric": symmetric, "auto": True,
                         "sigma": next((m[3] for m in MAPS if m[0] == key), None), "factor": factor}
        return f

    def _controls(self):
        """Colour range per map (auto from the data, or fixed -- set in the browser), theme, download."""
        names = [(k, next(m[1] for m in MAPS if m[0] == k) if any(m[0] == k for m in MAPS) else k.upper())
                 for k in list(self.maps) + list(self.virtual)]
        which = Select(title="colour range of", value=names[0][0], options=names, width=140, name="range-map")
        mode = RadioButtonGroup(labels=["auto", "fixed"], active=0, name="range-mode")
        low = Spinner(title="low", value=0.0, step=0.1, width=90, name="range-low")
        high = Spinner(title="high", value=1.0, step=0.1, width=90, name="range-high")
        mappers = {k: v["mapper"] for k, v in {**self.maps, **self.virtual}.items()}
        apply = CustomJS(args=dict(mappers=mappers, which=which, mode=mode, low=low, high=high), code="""
            const m = mappers.get(which.value);
            if (mode.active == 1) { m.low = low.value; m.high = high.value; }
        """)
        low.js_on_change("value", apply)
        high.js_on_change("value", apply)
        mode.js_on_change("active", apply)
        mode.on_change("active", lambda attr, old, new: self._set_auto(which.value, new == 0))
        which.js_on_change("value", CustomJS(args=dict(mappers=mappers, which=which, low=low, high=high), code="""
            const m = mappers.get(which.value); low.value = m.low; high.value = m.high;"""))
        theme = RadioButtonGroup(labels=["light", "dark"], active=0, name="theme")
        theme.on_change("active", lambda attr, old, new: setattr(
            self.doc, "theme", "dark_minimal" if new == 1 else "caliber"))
        show_atoms = CheckboxGroup(labels=["atomic columns on the virtual images"], active=[0], name="show-atoms")
        show_atoms.js_on_change("active", CustomJS(args=dict(renderers=self.atom_renderers, box=show_atoms), code="""
            for (const r of renderers) { r.visible = box.active.includes(0); }"""))
        download = Button(label="download maps (CSV)", name="download", width=200)
        download.js_on_event("button_click", CustomJS(args=dict(sources={k: v["source"] for k, v in self.maps.items()}),
                                                      code="""
            const keys = Array.from(sources.keys());
            const first = sources.get(keys[0]).data.image[0];
            const ny = first.length, nx = first[0].length;
            const lines = ["block_row,block_col," + keys.join(",")];
            for (let i = 0; i < ny; i++) for (let j = 0; j < nx; j++) {
                lines.push([i, j].concat(keys.map(k => sources.get(k).data.image[0][i][j])).join(","));
            }
            const blob = new Blob([lines.join("\\n")], {type: "text/csv"});
            const a = document.createElement("a"); a.href = URL.createObjectURL(blob);
            a.download = "stemlive-maps.csv"; a.click();"""))
        return column(Div(text="<b>Display</b> (the save tool of each plot exports a PNG)"),
                      row(which, low, high), mode, theme, show_atoms, download)

    def _set_auto(self, key: str, auto: bool) -> None:
        entry = self.maps.get(key) or self.virtual.get(key)
        if entry is not None:
            entry["auto"] = auto

    # -- updates ------------------------------------------------------------------------------
    def _refresh(self) -> None:
        snap = self.feed.snapshot
        if snap is None:
            self._status(None)
            return
        if not self.built:
            with self.feed.lock:
                self._build(snap)
                self.version = snap.version
            self._show_latest(snap)
        elif snap.version != self.version and self._browser_ready():
            with self.feed.lock:
                changes = [rows for v, rows in snap.dirty_rows.items() if v > self.version]
                complete_log = len(changes) >= snap.version - self.version
                kinds = {kind for kind, _ in changes}
                full = not complete_log or "state" in kinds  # a resync: everything
                virtual = full or "virtual" in kinds
                rows = sorted(set().union(*[r for kind, r in changes if kind == "blocks"]))
                self._draw(snap, full, rows, virtual)
                if full or "atoms" in kinds:
                    self._draw_atoms(snap, full)
                self.version = snap.version
                sent = getattr(self.feed, "last_sent", None)
                self.sent_version, self.sent_at = snap.version, time.monotonic()
                if sent is not None and rows:
                    self._sent_stamps = {snap.version: sent}
                self.probe.text = f"{sent if sent is not None and rows else 'nan'} {snap.version}"
            if self.chosen is None:
                self._show_latest(snap)
        self._status(snap)

    def _on_ack(self, attr, old, new) -> None:
        try:
            sent = self._sent_stamps.pop(int(new), None)
        except ValueError:
            return
        if sent is not None:
            self.browser_delay_s = max(0.0, time.time() - sent)

    def _browser_ready(self) -> bool:
        """The browser has applied the last update (or has not answered for 5 s: send anyway)."""
        try:
            acked = int(self.ack.text)
        except ValueError:
            acked = 0
        return acked >= self.sent_version or time.monotonic() - self.sent_at > 5.0

    def _draw(self, snap, full: bool, rows: list[int], virtual: bool = True) -> None:
        derived = derived_maps(snap.maps)
        for key, e in self.maps.items():
            values = np.asarray(derived[key], np.float64)
            sigma = np.asarray(derived[e["sigma"]], np.float64) if e["sigma"] else None
            f = e["factor"]
            if full or f > 1:
                data = {"image": [downsample(values, f)]}
                if sigma is not None:
                    data["sigma"] = [downsample(sigma, f)]
                e["source"].data = data
            else:
                for r in rows:  # only the changed block rows go to the browser
                    patch = {"image": [((0, r, slice(None)), values[r])]}
                    if sigma is not None:
                        patch["sigma"] = [((0, r, slice(None)), sigma[r])]
                    e["source"].patch(patch)
            if e["auto"]:
                e["mapper"].low, e["mapper"].high = auto_range(values, e["symmetric"], key)
        if virtual:
            for key, e in self.virtual.items():
                values = downsample(np.asarray(snap.virtual[key], np.float64), e["factor"])
                e["source"].data = {"image": [values]}
                if e["auto"]:
                    e["mapper"].low, e["mapper"].high = auto_range(values, False)
        self._histogram(derived)

    def _draw_atoms(self, snap, full: bool) -> None:
        """Send the atoms found since the last draw (all of them after a resync)."""
        n = len(snap.atoms["positions"])
        if full or n < self.atoms_shown:
            self.atom_source.data = atom_columns(snap.atoms)
        elif n > self.atoms_shown:
            self.atom_source.stream(atom_columns(snap.atoms, self.atoms_shown))
        self.atoms_shown = n

    def _histogram(self, derived: dict | None = None) -> None:
        """Histogram of the chosen map (``derived``: the maps already computed for this draw)."""
        derived = derived if derived is not None else derived_maps(self.feed.snapshot.maps)
        values = derived[self.hist_map.value]
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            self.hist_source.data = {"left": [], "right": [], "top": []}
            return
        counts, edges = np.histogram(finite, bins=40)
        self.hist_source.data = {"left": edges[:-1], "right": edges[1:], "top": counts}

    def _status(self, snap) -> None:
        if snap is None:
            err = getattr(self.feed, "error", "")
            self.status.text = f"<b>waiting for the engine</b> (data being prepared?) {err}"
            return
        st = snap.status
        conn = "" if getattr(self.feed, "connected", True) else f" — <b>engine not reachable</b>: {self.feed.error}"
        delay = self.browser_delay_s
        self.status.text = (
            f"<b>{st.get('state', '?')}</b> — blocks {st.get('blocks_done', 0)}/{st.get('blocks_total', 0)}"
            f" — frames {st.get('frames_seen', 0)}/{st.get('frames_total', 0)}"
            f" — {st.get('frames_per_s', 0):.0f} frames/s"
            + (f" — delay to this browser {delay * 1e3:.0f} ms" if delay is not None else "")
            + (f" — atoms {len(snap.atoms['positions'])}" if len(snap.atoms["positions"]) else "")
            + (f" ({st['atoms_waiting']} blocks waiting for their neighbours)" if st.get("atoms_waiting") else "")
            + f" — dropped: {st.get('blocks_dropped', 0)} blocks, {st.get('frames_dropped', 0)} frames"
            + (f" — {st['reason']}" if st.get("reason") else "") + conn)

    # -- the chosen block and region -------------------------------------------------------------
    def _on_tap(self, event) -> None:
        if event.x is None or event.y is None:
            return
        self.chosen = (int(event.y // self.block[0]), int(event.x // self.block[1]))
        self.show_block(*self.chosen)

    def _show_latest(self, snap) -> None:
        latest = getattr(self.feed, "latest_block", None)
        if latest is None and snap.done.any():
            latest = tuple(int(v) for v in np.argwhere(snap.done)[-1])
        if latest is not None and latest != getattr(self, "_shown", None):
            self.show_block(*latest)

    def show_block(self, i: int, j: int) -> None:
        self._shown = (i, j)
        try:
            header, pac = self.feed.block_pacbed(i, j)
        except (TimeoutError, ValueError, OSError) as exc:
            self.pacbed_info.text = f"block ({i}, {j}): {exc}"
            return
        h, w = pac.shape
        self.pacbed_source.data = {"image": [np.asarray(pac[::-1], np.float64)], "dw": [w], "dh": [h]}
        finite = pac[np.isfinite(pac)]
        if finite.size:
            self.pacbed_mapper.low, self.pacbed_mapper.high = float(finite.min()), float(np.percentile(finite, 99.5))
        est = header.get("estimate", {})
        c, r = est.get("center_px"), est.get("radius_px")
        if c and r is not None and all(v is not None and np.isfinite(v) for v in list(c) + [r]):
            # drawn with row 0 at the top: pixel (row, col) has its centre at (col + 0.5, h - row - 0.5)
            self.circle_source.data = {"x": [c[1] + 0.5], "y": [h - c[0] - 0.5], "r": [r]}
        else:
            self.circle_source.data = {"x": [], "y": [], "r": []}
        self.pacbed_info.text = block_text(i, j, header)

    def _on_select(self, event) -> None:
        g = event.geometry
        if g.get("type") != "rect":
            return
        x0, x1 = sorted((g["x0"], g["x1"]))
        y0, y1 = sorted((g["y0"], g["y1"]))
        snap = self.feed.snapshot
        by, bx = self.block
        i0, i1 = max(0, int(y0 // by)), min(snap.done.shape[0], int(math.ceil(y1 / by)))
        j0, j1 = max(0, int(x0 // bx)), min(snap.done.shape[1], int(math.ceil(x1 / bx)))
        with self.feed.lock:
            sel = snap.maps["tilt_crystal_mrad"][i0:i1, j0:j1].reshape(-1, 2)
            det = snap.maps["tilt_mrad"][i0:i1, j0:j1].reshape(-1, 2)
        ok = np.isfinite(sel).all(axis=1)
        if not ok.any():
            self.region_info.text = "no analysed blocks in the selected region"
            return
        mean_c, mean_d = sel[ok].mean(axis=0), det[ok].mean(axis=0)
        self.region_info.text = (f"<b>region</b> blocks {i0}-{i1 - 1} × {j0}-{j1 - 1} ({int(ok.sum())} analysed): "
                                 f"detector t0 {mean_d[0]:+.2f}, t1 {mean_d[1]:+.2f} mrad; "
                                 + crystal_correction(mean_c))


def atom_columns(atoms: dict, start: int = 0) -> dict[str, np.ndarray]:
    """The atom table from row ``start`` as plot columns (x = col + 0.5, y = row + 0.5)."""
    pos = np.asarray(atoms["positions"], np.float64)[start:]
    return {"x": pos[:, 1] + 0.5, "y": pos[:, 0] + 0.5,
            "confidence": np.asarray(atoms["confidence"], np.float64)[start:]}


def block_text(i: int, j: int, header: dict) -> str:
    est = header.get("estimate", {})
    if not header.get("done"):
        return f"<b>block ({i}, {j})</b>: not analysed yet ({header.get('frames', 0)} frames so far)"

    def num(v, fmt="{:.1f}"):
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    t, ts = est.get("thickness_nm"), est.get("thickness_sigma_nm")
    tilt, tsig = est.get("tilt_mrad") or [None, None], est.get("tilt_sigma_mrad") or [None, None]
    return (f"<b>block ({i}, {j})</b>, {header.get('frames')} frames: "
            f"<span class='thickness'>thickness {num(t)} ± {num(ts)} nm</span>; "
            f"tilt t0 {num(tilt[0], '{:+.2f}')} ± {num(tsig[0], '{:.2f}')}, "
            f"t1 {num(tilt[1], '{:+.2f}')} ± {num(tsig[1], '{:.2f}')} mrad")


def make_document(doc, feed) -> Page:
    return Page(doc, feed)
