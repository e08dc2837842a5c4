"""The operator's page: maps on the block grid, virtual images, the PACBED of a block, status.

One `Page` per browser session; all sessions read the same feed (one per server process).  A
10 Hz callback per session draws what changed since that session last drew -- only the changed
block rows go out, as `ColumnDataSource.patch` -- and waits for the browser to acknowledge each
update, so a slow browser gets fewer, larger updates instead of a backlog.  Scan pixels are
square and the axes are in nm when the scan step is known.  A block's PACBED is fetched on a
worker thread and drawn on the next tick: the request never waits inside the event loop.

Virtual detectors the operator sets (`ring_panel.py`: a range slider per ring, in mrad or α)
are asked for the same way, on their own worker thread: when a slider is let go, the page asks
the feed for that session's rings -- images of the whole scan, summed from the per-frame radial
profiles by the engine (or read from the store) -- and draws them on the next tick.  New frames
keep the operator's rings by asking again: live virtual messages carry the engine's default
rings, so while a session has rings of its own, new scan rows mark them stale and the page asks
for them again at most every RING_REFRESH_S (and once more after the last change), instead of
drawing the default rows over them.  That keeps one code path (the full-scan request) for both,
costs one request per half second per session while frames come, and is exact: no ring is ever
patched from a different calibration than the rest of its image.
"""
from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
from bokeh.events import SelectionGeometry, Tap
from bokeh.layouts import column, gridplot, row
from bokeh.models import (BoxSelectTool, BoxZoomTool, Button, CheckboxGroup, ColorBar, ColumnDataSource,
                          CustomJS, Div, HoverTool, LinearColorMapper, MetricLength, PanTool, RadioButtonGroup,
                          Range1d, ResetTool, SaveTool, ScaleBar, Select, Spinner, TabPanel, Tabs, TapTool,
                          WheelZoomTool)
from bokeh.plotting import figure

from . import hover
from .display import (ANOMALY_COLOUR, COM_VIEWS, UNKNOWN_COLOUR, settled_range, set_range, species_colours,
                      species_legend, GREY, MAP_BY_KEY, MAP_TABS, MAPS, VIRTUAL, auto_range, crystal_correction, derived_maps,
                      display_factor, doubtful, downsample, holder_text, region_stats, status_text)
from .exports import maps_csv
from .pacbed_panel import PacbedPanel, block_text
from .one_message import one_message
from .patches import row_patch
from .ring_panel import LABELS, RingPanel

TRANSPARENT = (0, 0, 0, 0)
MAP_PX = 260  # the longer side of a map's frame, in screen px
REFRESH_MS = 50
FOLLOW_S = 1.0  # "follow latest" fetches the newest block's PACBED at most this often
FOLLOW_QUIET_S = 0.5  # ... when no block update was sent for this long
FOLLOW_MAX_S = 3.0  # ... or, while blocks keep coming, this long after the last fetch
BACKGROUND_S = 1.0  # virtual-image rows alone are drawn at most this often (each redraws 4-8 plots)
STATUS_S = 0.5  # the status line (and the spinners' auto range) change at most this often
OUTLINE = "#ff00ff"
RING_REFRESH_S = 0.5  # while frames come, a session's own rings are asked for again at most this often
RATE_S = 30.0  # the status line's frames/s: between the frame count's changes in the last this many s

class Page:
    def __init__(self, doc, feed, holder_axis_deg: float | None = None):
        self.doc, self.feed = doc, feed
        self.holder_axis_given = holder_axis_deg
        self.version = 0
        self.built = False
        self.chosen: tuple[int, int] | None = None  # pinned block; None: follow the latest
        self.status = Div(text="<b>Connecting to the acquisition engine…</b>", sizing_mode="stretch_width",
                          name="status")
        # flow control and the latency probe: the publish time of the newest block drawn rides in
        # the same document patch as the maps; the browser notes its arrival and acknowledges the
        # update once drawn, and the server sends the next only then
        # (data sources, not Divs: a changed Div text restyles the page, and Bokeh's next canvas
        # render then recomputes every element's style -- most of the browser's time per update)
        self.probe = ColumnDataSource(data={"msg": [""]}, name="latency-probe")
        self.ack = ColumnDataSource(data={"msg": ["0"]}, name="ack")
        # The probe also carries when the engine had the newest block's last frame: once the maps
        # are drawn, the browser measures that frame -> this page on its own clock (the engine's and
        # the browser's are one clock on one machine) and sends it back with the acknowledgement.
        self.probe.js_on_change("data", CustomJS(args=dict(probe=self.probe, ack=self.ack), code="""
            const [sent, version, completed] = probe.data.msg[0].split(" ");
            const s = parseFloat(sent);
            if (!Number.isNaN(s)) { (window.stemliveDelays = window.stemliveDelays || []).push(Date.now() / 1000 - s); }
            requestAnimationFrame(() => {  // after the maps are drawn
              const c = parseFloat(completed);
              let d = "";
              if (!Number.isNaN(c)) {
                d = Date.now() / 1000 - c;
                (window.stemliveFrameDelays = window.stemliveFrameDelays || []).push(d);
              }
              ack.data = {msg: [version + " " + d]};
            });
        """))
        self.sent_version = 0
        self.sent_at = 0.0
        self._before_last = 0  # the version of the update sent before the last one
        self.browser_delay_s: float | None = None  # engine publish -> this browser applied it
        self.frame_delay_s: float | None = None  # a block's last frame -> drawn here (measured by the browser)
        self._completed_sent: float | None = None
        self._rate: list[tuple[float, int]] = []  # (monotonic, frames seen): frames/s over the last RATE_S
        self._sent_stamps: dict[int, float] = {}
        self.ack.on_change("data", self._on_ack)
        self.root = column(self.status, sizing_mode="stretch_width")
        doc.add_root(self.root)
        doc.add_root(self.probe)
        doc.add_root(self.ack)
        doc.title = "stemlive"
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="stemlive-pacbed")  # block PACBED requests
        self._busy = False
        self._wanted: tuple[tuple[int, int], bool] | None = None
        self._shown: tuple[int, int] | None = None
        self._followed_at = -math.inf
        self._blocks_sent_at = -math.inf  # the last update with analysed blocks
        self._virtual_drawn_at = -math.inf
        self._virtual_due: set[int] | str | None = None  # virtual-image rows not yet drawn ("all": every row)
        self._atoms_due = False  # atomic columns not yet sent
        self._histogram_due = False  # analysed blocks not yet in the histogram
        self._status_at = -math.inf
        self._range_at = -math.inf
        # the operator's rings: asked for on their own worker (a slow sum never delays a PACBED)
        self._ring_pool = ThreadPoolExecutor(1, thread_name_prefix="stemlive-rings")
        self.rings: RingPanel | None = None
        self.own_rings: set[str] = set()  # rings this session set (drawn from its requests, not the feed's rows)
        self.ring_images: dict[str, np.ndarray] = {}  # their latest images (scan grid)
        self._ring_busy = False
        self._ring_again = False  # a change came while a request was out
        self._ring_stale = False  # new frames since the last request
        self._ring_asked_at = -math.inf
        self._rings_drawn = 0
        self.rings_drawn = ColumnDataSource(data={"msg": [""]}, name="rings-drawn")
        doc.add_root(self.rings_drawn)
        # slider let go (browser) -> those rings drawn (browser): the delay the operator sees
        self.rings_drawn.js_on_change("data", CustomJS(args=dict(div=self.rings_drawn), code="""
            const drawn = JSON.parse(div.data.msg[0] || "{}").rings || {};
            const asked = window.stemliveRingAsked;
            requestAnimationFrame(() => {
              if (!asked) return;
              const got = drawn[asked.name];
              if (got && Math.abs(got[0] - asked.value[0]) < 1e-9 && Math.abs(got[1] - asked.value[1]) < 1e-9) {
                (window.stemliveRingDelays = window.stemliveRingDelays || []).push((performance.now() - asked.t) / 1000);
                window.stemliveRingAsked = undefined;
              }
            });"""))

        def closed(ctx):
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._ring_pool.shutdown(wait=False, cancel_futures=True)
        doc.on_session_destroyed(closed)
        doc.add_periodic_callback(self._refresh, REFRESH_MS)
        self._refresh()

    # -- layout (once the first state has arrived) ---------------------------------------------
    def _build(self, snap) -> None:
        sy, sx = snap.scan_shape
        self.block = snap.block_shape
        self.flag_names = list(snap.flag_names)
        # the holder's α axis on the detector: given to `stemlive dashboard`, else the run's (if it stored one)
        axis = self.holder_axis_given if self.holder_axis_given is not None else snap.meta.get("holder_axis_deg")
        self.holder_axis = float(axis) if axis is not None and math.isfinite(float(axis)) else None
        step = snap.meta.get("scan_step_nm")
        self.step = float(step) if step is not None and math.isfinite(float(step)) and float(step) > 0 else None
        self.s = self.step or 1.0  # data units per scan pixel
        self.unit = "nm" if self.step else "px"
        self.factor = display_factor(snap.done.shape)
        self.x_range, self.y_range = Range1d(0, sx * self.s), Range1d(sy * self.s, 0)  # row 0 at the top
        scale = MAP_PX / max(sy, sx)
        self.frame = (max(60, round(sx * scale)), max(60, round(sy * scale)))  # square scan pixels
        self.maps, self.virtual = {}, {}
        derived = derived_maps(snap.maps)
        gy, gx = snap.done.shape
        block_extent = (gx * self.block[1] * self.s, gy * self.block[0] * self.s)
        # the flag bits of each block, read by every map's hover (names in the browser)
        self.flag_source = ColumnDataSource({"bits": [self._flag_bits(derived)]}, name="source-flag-bits")
        figs = [self._image_figure(m.key, m.title, m.unit, derived, m.palette, m.kind, self.maps, block_extent,
                                   self.factor, blocks=True) for m in MAPS]
        vf = display_factor(snap.scan_shape)
        vkeys = [key for key, _ in VIRTUAL if key in snap.virtual]
        # rings the operator sets, and a custom annulus (not for a store without per-frame profiles)
        if hasattr(self.feed, "ring_images") and not (snap.meta.get("read_only") and not snap.meta.get("radial")):
            self.rings = RingPanel(vkeys + ["custom"], snap.meta, self._ring_changed)
            vkeys.append("custom")
            self.own_rings.add("custom")
        blank = np.full(snap.scan_shape, np.nan)
        vfigs = [self._image_figure(key, LABELS.get(key, key), "counts", {key: snap.virtual.get(key, blank)}, GREY,
                                    "sequential", self.virtual, (sx * self.s, sy * self.s), vf, blocks=False)
                 for key in vkeys]
        if self.rings is not None:
            for key in vkeys:
                self._ring_title(key)
        # centre-of-mass maps (runs with --com): beside the rings, not adjustable by them
        com_unit = "mrad" if snap.meta.get("mrad_per_px") else "px"
        cfigs = [self._image_figure(key, title, com_unit if unit == "mrad" else unit, {key: snap.virtual[key]},
                                    palette, kind, self.virtual, (sx * self.s, sy * self.s), vf, blocks=False)
                 for key, title, unit, palette, kind in COM_VIEWS if key in snap.virtual]
        # atomic columns over the virtual images (off at first: at full view they hide the image)
        # coloured by species where the per-column analyses ran; anomalous columns squared
        self.species_names = list(snap.meta.get("species_names") or [])
        self.atom_source = ColumnDataSource(self._atom_columns(snap.atoms), name="source-atoms")
        self.anomaly_source = ColumnDataSource(self._anomaly_columns(snap.atoms), name="source-anomalies")
        self.atoms_shown = len(snap.atoms["positions"])
        self.atom_renderers = [f.scatter(x="x", y="y", source=self.atom_source, marker="circle", size=5,
                                         fill_alpha=0, line_color="colour", line_width=1.2,
                                         name=f"atoms-{f.name[4:]}", visible=False) for f in vfigs]
        self.anomaly_renderers = [f.scatter(x="x", y="y", source=self.anomaly_source, marker="square", size=10,
                                            fill_alpha=0, line_color=ANOMALY_COLOUR, line_width=1.5,
                                            name=f"anomalies-{f.name[4:]}", visible=False) for f in vfigs]
        self.atom_legend = Div(text=species_legend(self.species_names), name="atom-legend", visible=False)
        # doubtful blocks greyed over the thickness map: an image on the block grid, patched by rows
        # like the maps (a glyph per doubtful block grew too slow on large grids)
        self.doubt_source = ColumnDataSource({"image": [self._doubt_mask(snap)]}, name="source-doubt")
        self.doubt_renderer = self.maps["thickness"]["figure"].image(
            image="image", x=0, y=0, dw=block_extent[0], dh=block_extent[1], source=self.doubt_source,
            color_mapper=LinearColorMapper(palette=["#5f5f5f"], low=0, high=1, nan_color=TRANSPARENT),
            global_alpha=0.7, name="doubt")
        # the block whose PACBED is shown, outlined on every map and image
        self.chosen_source = ColumnDataSource({"left": [], "right": [], "top": [], "bottom": []},
                                              name="source-chosen")
        for f in figs + vfigs + cfigs:
            f.quad(left="left", right="right", top="top", bottom="bottom", source=self.chosen_source,
                   fill_alpha=0, line_color=OUTLINE, line_width=2)
            f.on_event(Tap, self._on_tap)
            f.on_event(SelectionGeometry, self._on_select)
        self.figures = figs + vfigs + cfigs
        self.pacbed = PacbedPanel(MAP_PX, self._follow_latest)
        self.region_info = Div(text="<i>box-select a region on any map (toolbar: box select): mean ± sd "
                                    "and count of every map there, and the tilt correction"
                                    + (" (also as holder α/β)" if self.holder_axis is not None else "") + "</i>",
                               width=MAP_PX + 80, name="region-info")
        self.hist_source = ColumnDataSource({"left": [], "right": [], "top": []}, name="source-histogram")
        self.hist_map = Select(title="histogram of", value="thickness", options=[(m.key, m.title) for m in MAPS],
                               width=MAP_PX, name="histogram-map")
        self.hist_map.on_change("value", lambda attr, old, new: self._histogram())
        h = figure(title="Histogram", width=MAP_PX + 80, height=170, tools="", name="histogram")
        h.quad(left="left", right="right", top="top", bottom=0, source=self.hist_source)
        self.hist_fig = h
        controls = self._controls()
        meta = snap.meta
        self.models = Div(text=(f"models: {', '.join(meta.get('models', [])) or '—'}"
                                + (f" — store: {meta['store']}" if meta.get("store") else "")
                                + f" — scan {sy}×{sx} px, blocks of {self.block[0]}×{self.block[1]} px"
                                + (f", scan step {self.step:.4g} nm" if self.step
                                   else ", scan step unknown (axes in px)")
                                + (f", holder α axis at {self.holder_axis:g}° (detector axis 1 → 0)"
                                   if self.holder_axis is not None else "")),
                          name="models", sizing_mode="stretch_width")
        side = column(self.pacbed.layout(), self.region_info, self.hist_map, self.hist_fig, controls)
        by_key = dict(zip((m.key for m in MAPS), figs))
        map_tabs = self._tabs([(title, [by_key[k] for k in keys], self._grid([by_key[k] for k in keys], 2,
                                                                            "stemlive-maps"))
                               for title, keys in MAP_TABS], "map-tabs")
        # the detectors below, in tabs too (only the tab on show is repainted)
        detector_tabs = []
        if vfigs:
            # beside the ring sliders, three a row (the page stays within a 1750 px window)
            vgrid = self._grid(vfigs, 3 if self.rings is not None else 4, "stemlive-virtual")
            vgrid.name = "virtual-grid"
            detector_tabs.append(("Virtual detectors (scan grid)", vfigs,
                                  row(vgrid, self.rings.layout()) if self.rings is not None else vgrid))
        if cfigs:
            cgrid = self._grid(cfigs, 4, "stemlive-com")
            cgrid.name = "com-grid"
            detector_tabs.append(("Centre of mass", cfigs, column(Div(text="DPC shift from the calibrated disk centre, "
                                                                           "in the scan frame; iDPC its integral: "
                                                                           "columns bright"), cgrid)))
        self.root.children = [self.status, self.models, row(map_tabs, side)]
        if detector_tabs:
            self.root.children += [self._tabs(detector_tabs, "detector-tabs")]
        self.built = True
        self._histogram(derived)
        if self.rings is not None:
            self._ask_rings()  # the custom annulus

    @staticmethod
    def _tabs(panels: list, name: str) -> Tabs:
        """Tabs of (title, figures, layout).  The figures of a tab not on show hold their render:
        a hidden Bokeh tab's plots still repaint on every change of their data."""
        groups = [figs for _, figs, _ in panels]
        for figs in groups[1:]:
            for f in figs:
                f.hold_render = True
        tabs = Tabs(tabs=[TabPanel(child=layout, title=title) for title, _, layout in panels], name=name)
        tabs.js_on_change("active", CustomJS(args=dict(tabs=tabs, groups=groups), code="""
            groups.forEach((figs, k) => { for (const f of figs) f.hold_render = k != tabs.active; });"""))
        return tabs

    @staticmethod
    def _grid(figs, ncols: int, name: str):
        """Figures sharing one toolbar; its save tool names the file (no prompt)."""
        grid = gridplot(figs, ncols=ncols, toolbar_location="right")
        for tool in grid.toolbar.tools:
            if isinstance(tool, SaveTool):
                tool.filename = name
        return grid

    def _image_figure(self, key, title, unit, values, palette, kind, registry, extent, factor, blocks: bool):
        dw, dh = extent
        # unscanned blocks and pixels: transparent
        mapper = LinearColorMapper(palette=list(palette), nan_color=TRANSPARENT, name=f"mapper-{key}")
        data = self._columns(key, values, factor, blocks)
        mapper.low, mapper.high = auto_range(data["image"][0], kind)
        source = ColumnDataSource(data, name=f"source-{key}")
        block = (self.block[0] * self.s, self.block[1] * self.s)
        tooltips = [("block (i, j)", "$y{blk}"), ("at", f"$x{{pos}}, $y{{pos}} {self.unit}"),
                    (title.split(" (")[0], f"@image{{0.00}} {unit}")]
        formatters = hover.formatters(block, (block[0] * self.factor, block[1] * self.factor), self.flag_source,
                                      self.flag_names)
        if "sigma" in data:
            tooltips.append(("σ", f"@sigma{{0.00}} {unit}"))
        tooltips.append(("flags", "$x{flags}"))
        axis = f"{self.unit}"
        f = figure(title=title + (f" [{unit}]" if unit else ""), frame_width=self.frame[0],
                   frame_height=self.frame[1], x_range=self.x_range, y_range=self.y_range, name=f"map-{key}",
                   tools=[PanTool(), WheelZoomTool(zoom_on_axis=False), BoxZoomTool(match_aspect=True),
                          BoxSelectTool(), TapTool(), ResetTool(), SaveTool(filename=f"stemlive-{key}")],
                   x_axis_label=axis, y_axis_label=axis)
        f.toolbar.logo = None
        f.grid.visible = False  # under an image it is never seen, yet each repaint reads its styles
        img = f.image(image="image", x=0, y=0, dw=dw, dh=dh, source=source, color_mapper=mapper)
        f.add_tools(HoverTool(tooltips=tooltips, formatters=formatters, renderers=[img]))
        f.add_layout(ColorBar(color_mapper=mapper, width=8), "right")
        if self.step:
            f.add_layout(ScaleBar(range=f.x_range, unit="nm", dimensional=MetricLength(), location="bottom_left",
                                  bar_length=0.2, background_fill_alpha=0.5, label_text_font_size="9px",
                                  padding=2, margin=4))
        registry[key] = {"source": source, "mapper": mapper, "kind": kind, "auto": True, "factor": factor,
                         "figure": f, "title": title, "blocks": blocks}
        return f

    def _flag_bits(self, derived: dict) -> np.ndarray:
        bits = derived["flag_bits"]
        if self.factor == 1:
            return bits
        f = self.factor  # several blocks per displayed pixel: the flags of any of them
        ny, nx = bits.shape
        pad = np.zeros((-(-ny // f) * f, -(-nx // f) * f), np.uint64)
        pad[:ny, :nx] = np.nan_to_num(bits).astype(np.uint64)
        return np.bitwise_or.reduce(np.bitwise_or.reduce(pad.reshape(pad.shape[0] // f, f, -1, f), axis=3),
                                    axis=1).astype(np.float64)

    def _columns(self, key: str, values: dict, factor: int, blocks: bool) -> dict:
        data = {"image": [downsample(np.asarray(values[key], np.float64), factor)]}
        if blocks and MAP_BY_KEY[key].sigma:
            data["sigma"] = [downsample(values[MAP_BY_KEY[key].sigma], factor)]
        return data

    def _controls(self):
        """Colour range per map (auto from the data, or fixed), theme, overlays, CSV."""
        names = [(k, v["title"]) for k, v in {**self.maps, **self.virtual}.items()]
        self.range_map = Select(title="colour range of", value=names[0][0], options=names, width=150,
                                name="range-map")
        self.range_mode = RadioButtonGroup(labels=["auto", "fixed"], active=0, name="range-mode")
        self.range_low = Spinner(title="low", step=0.1, width=90, format="0.[000]", name="range-low")
        self.range_high = Spinner(title="high", step=0.1, width=90, format="0.[000]", name="range-high")
        self._show_range()
        self.range_map.on_change("value", lambda attr, old, new: self._show_range())
        self.range_mode.on_change("active", self._on_range_mode)
        self.range_low.on_change("value", self._on_range_value)
        self.range_high.on_change("value", self._on_range_value)
        self.theme = RadioButtonGroup(labels=["light", "dark"], active=0, name="theme")
        self.theme.on_change("active", self._on_theme)
        self.theme.js_on_change("active", CustomJS(args=dict(theme=self.theme), code="""
            const dark = theme.active == 1;  // the page around the plots (Divs, widgets' labels)
            document.body.style.backgroundColor = dark ? "#15191c" : "";
            document.body.style.color = dark ? "#e6e6e6" : "";"""))
        self.show_atoms = CheckboxGroup(labels=["atomic columns over the virtual images (colour: species)",
                                                "anomalous columns (point defects)"], active=[], name="show-atoms")
        self.show_atoms.on_change("active", self._on_overlay)
        self.show_atoms.js_on_change("active", CustomJS(
            args=dict(renderers=self.atom_renderers, anomalies=self.anomaly_renderers, legend=self.atom_legend,
                      box=self.show_atoms),
            code="""for (const r of renderers) { r.visible = box.active.includes(0); }
                    for (const r of anomalies) { r.visible = box.active.includes(1); }
                    legend.visible = box.active.length > 0;"""))
        self.show_doubt = CheckboxGroup(labels=["grey out doubtful blocks on the thickness map (flags, σ > 5 nm)"],
                                        active=[0], name="show-doubt")
        self.show_doubt.js_on_change("active", CustomJS(args=dict(r=self.doubt_renderer, box=self.show_doubt),
                                                        code="r.visible = box.active.includes(0);"))
        # the CSV is written on the server (full resolution, flag names) and handed to the browser
        self.csv_source = ColumnDataSource({"text": [], "name": []}, name="source-csv")
        self.csv_source.js_on_change("data", CustomJS(args=dict(src=self.csv_source), code="""
            if (!src.data.text.length) return;
            const blob = new Blob([src.data.text[0]], {type: "text/csv"});
            const a = document.createElement("a"); a.href = URL.createObjectURL(blob);
            a.download = src.data.name[0]; document.body.appendChild(a); a.click(); a.remove();
            setTimeout(() => URL.revokeObjectURL(a.href), 10000);"""))
        download = Button(label="download maps (CSV)", name="download", width=200,
                          tags=[self.csv_source])  # the tag puts the source in the document
        download.on_click(self._send_csv)
        return column(Div(text="<b>Display</b> (each plot's save tool exports a PNG)"),
                      row(self.range_map, self.range_low, self.range_high), self.range_mode, self.theme,
                      self.show_atoms, self.atom_legend, self.show_doubt, download)

    # -- control callbacks (server side: every session keeps its own ranges) ------------------
    def _entry(self, key: str) -> dict:
        return self.maps.get(key) or self.virtual[key]

    def _show_range(self) -> None:
        e = self._entry(self.range_map.value)
        self._syncing = True
        try:
            self.range_mode.active = 0 if e["auto"] else 1
            self.range_low.value, self.range_high.value = float(e["mapper"].low), float(e["mapper"].high)
            span = abs(float(e["mapper"].high) - float(e["mapper"].low)) or 1.0
            step = 10 ** math.floor(math.log10(span / 50))
            self.range_low.step = self.range_high.step = step
        finally:
            self._syncing = False

    def _on_range_mode(self, attr, old, new) -> None:
        if getattr(self, "_syncing", False):
            return
        e = self._entry(self.range_map.value)
        e["auto"] = new == 0
        if e["auto"]:
            e["mapper"].low, e["mapper"].high = auto_range(e["source"].data["image"][0], e["kind"])
        else:  # fixed: keep the present range until the operator types another
            self._on_range_value(None, None, None)
        self._show_range()

    def _on_range_value(self, attr, old, new) -> None:
        if getattr(self, "_syncing", False):
            return
        e = self._entry(self.range_map.value)
        if e["auto"]:
            return
        lo, hi = self.range_low.value, self.range_high.value
        if lo is not None and hi is not None and hi > lo:
            e["mapper"].update(low=float(lo), high=float(hi))

    def _on_theme(self, attr, old, new) -> None:
        dark = new == 1
        self.doc.theme = "dark_minimal" if dark else None  # None: Bokeh's default, the page's first look
        for f in self.figures:  # the doubt mask and outlines stay visible on both
            f.background_fill_color = "#20262b" if dark else "#ffffff"

    def _together(self, callback, *args) -> None:
        """``callback(*args)``'s changes as one message (a PACBED shown changes four plots)."""
        with one_message(self.doc):
            callback(*args)

    def _overlay_shown(self) -> bool:
        return bool(self.show_atoms.active)

    def _on_overlay(self, attr, old, new) -> None:
        """Overlay ticked: the columns found while it was hidden go now."""
        snap = self.feed.snapshot
        if new and self._atoms_due and snap is not None:
            with self.feed.lock:
                self._draw_atoms(snap, False)
            self._atoms_due = False

    def _send_csv(self) -> None:
        snap = self.feed.snapshot
        with self.feed.lock:
            text = maps_csv(snap.maps, snap.done, self.flag_names, self.block, self.step)
        self.csv_source.data = {"text": [text], "name": ["stemlive-maps.csv"]}

    def _follow_latest(self) -> None:
        self.chosen = None
        self._shown = None
        self._show_latest(self.feed.snapshot, force=True)

    # -- updates ------------------------------------------------------------------------------
    def _refresh(self) -> None:
        """One tick: every change it makes leaves as one websocket message (Bokeh would send each
        change on its own, serialised and applied in the browser one by one)."""
        with one_message(self.doc):
            self._refresh_held()

    def _refresh_held(self) -> None:
        snap = self.feed.snapshot
        if snap is None:
            self._status(None)
            return
        if not self.built:
            with self.feed.lock:
                self._build(snap)
                self.version = snap.version
        elif snap.version != self.version and self._browser_ready():
            with self.feed.lock:
                changes = [rows for v, rows in snap.dirty_rows.items() if v > self.version]
                complete_log = len(changes) >= snap.version - self.version
                kinds = {kind for kind, _ in changes}
                full = not complete_log or "state" in kinds  # a resync: everything
                rows = sorted(set().union(*[r for kind, r in changes if kind == "blocks"]))
                running = snap.status.get("state", "running") == "running"
                since = time.monotonic() - self._virtual_drawn_at
                for kind, r in changes:  # new scan rows of the virtual images, drawn when due
                    if kind == "virtual":
                        self._virtual_due = "all" if r is None or self._virtual_due == "all" else \
                            (self._virtual_due or set()) | set(r)
                # Virtual rows wait (at most BACKGROUND_S, or twice that while blocks keep coming),
                # so the browser is free when analysed blocks come: the maps' delay is what the
                # operator watches, and an update with both redraws every plot on the page.
                virtual = full or (self._virtual_due is not None and (
                    not running or since >= (2 * BACKGROUND_S if rows else BACKGROUND_S)))
                # New atomic columns go with the virtual images they are drawn over, and only while
                # the overlay is shown (a changed source repaints its plots, drawn or not); all of
                # them once the run has ended.
                self._atoms_due = self._atoms_due or "atoms" in kinds
                atoms = full or (self._atoms_due and (not running or (self._overlay_shown() and (
                    virtual or since >= 2 * BACKGROUND_S))))
                if not (full or rows or virtual or atoms or (self._histogram_due and not running)):
                    self._status(snap)
                    return
                virtual_rows = None if full or self._virtual_due == "all" else sorted(self._virtual_due or ())
                if virtual:
                    self._virtual_drawn_at, self._virtual_due = time.monotonic(), None
                self._draw(snap, full, rows, virtual, virtual_rows, running)
                if atoms:
                    self._draw_atoms(snap, full)
                    self._atoms_due = False
                self.version = snap.version
                sent = getattr(self.feed, "last_sent", None)
                self._before_last = self.sent_version
                self.sent_version, self.sent_at = snap.version, time.monotonic()
                if rows:
                    self._blocks_sent_at = self.sent_at
                if sent is not None and rows:
                    self._sent_stamps = {snap.version: sent}
                completed = getattr(self.feed, "last_completed", None)
                fresh = completed is not None and rows and completed != self._completed_sent
                if fresh:
                    self._completed_sent = completed
                self.probe.data = {"msg": [f"{sent if sent is not None and rows else 'nan'} {snap.version} "
                                           f"{completed if fresh else 'nan'}"]}
        if self.chosen is None:
            self._show_latest(snap)
        if self._ring_stale and not self._ring_busy and time.monotonic() - self._ring_asked_at >= RING_REFRESH_S:
            self._ask_rings()
        self._status(snap)

    def _on_ack(self, attr, old, new) -> None:
        parts = str(new["msg"][0]).split(" ")
        try:
            sent = self._sent_stamps.pop(int(parts[0]), None)
        except ValueError:
            return
        if sent is not None:
            self.browser_delay_s = max(0.0, time.time() - sent)
        try:
            delay = float(parts[1]) if len(parts) > 1 and parts[1] else None
        except ValueError:
            delay = None
        if delay is not None and math.isfinite(delay):
            self.frame_delay_s = max(0.0, delay)

    def _browser_ready(self) -> bool:
        """The browser has drawn the update before the last one (or has not answered for 5 s: send
        anyway): one update travels while the browser draws the other, and no more queue up."""
        try:
            acked = int(self.ack.data["msg"][0].split(" ")[0])
        except (ValueError, KeyError, IndexError):
            acked = 0
        return acked >= self._before_last or time.monotonic() - self.sent_at > 5.0

    def _draw(self, snap, full: bool, rows: list[int], virtual: bool = True, virtual_rows=None,
              running: bool = True) -> None:
        derived = derived_maps(snap.maps)
        for key, e in self.maps.items():
            if full or e["factor"] > 1:
                e["source"].data = self._columns(key, derived, e["factor"], True)
            elif rows:  # only the changed block rows go to the browser
                cols = self._columns(key, derived, 1, True)
                e["source"].patch({name: row_patch(vals[0], rows) for name, vals in cols.items()})
            if e["auto"]:
                set_range(e["mapper"], settled_range((e["mapper"].low, e["mapper"].high), auto_range(derived[key], e["kind"])))
        if full or self.factor > 1:
            self.flag_source.data = {"bits": [self._flag_bits(derived)]}
        elif rows:
            self.flag_source.patch({"bits": row_patch(derived["flag_bits"], rows)})
        if full or self.factor > 1:
            self.doubt_source.data = {"image": [self._doubt_mask(snap)]}
        elif rows:
            self.doubt_source.patch({"image": row_patch(self._doubt_mask(snap), rows)})
        if virtual and self.own_rings:
            self._ring_stale = True  # new frames: this session's own rings are asked for again
        if virtual:
            for key, e in self.virtual.items():
                if key in self.own_rings or key not in snap.virtual:
                    continue  # drawn from this session's ring requests
                img = np.asarray(snap.virtual[key], np.float64)
                if full or e["factor"] > 1 or not virtual_rows:
                    e["source"].data = {"image": [downsample(img, e["factor"])]}
                else:  # only the scan rows that changed
                    e["source"].patch({"image": row_patch(img, virtual_rows)})
                if e["auto"]:
                    set_range(e["mapper"], settled_range((e["mapper"].low, e["mapper"].high), auto_range(img, "sequential")))
        if self.range_mode.active == 0:
            if time.monotonic() - self._range_at >= STATUS_S:  # at most twice a second
                self._range_at = time.monotonic()
                self._show_range()  # the spinners show the auto range of the chosen map
        # the histogram goes with the virtual images (≤ 1/s, 1 per 2 s while blocks come): drawn
        # with each block update it was the page's costliest plot
        self._histogram_due = self._histogram_due or bool(rows)
        if self._histogram_due and (full or virtual or not running):
            self._histogram(derived)
            self._histogram_due = False

    def _draw_atoms(self, snap, full: bool) -> None:
        """Send the atoms found since the last draw (all of them after a resync)."""
        n = len(snap.atoms["positions"])
        names = list(snap.meta.get("species_names") or [])
        if names != self.species_names:  # the classes became known: every marker and the legend anew
            self.species_names, full = names, True
            self.atom_legend.text = species_legend(names)
        if full or n < self.atoms_shown:
            self.atom_source.data = self._atom_columns(snap.atoms)
            self.anomaly_source.data = self._anomaly_columns(snap.atoms)
        elif n > self.atoms_shown:
            self.atom_source.stream(self._atom_columns(snap.atoms, self.atoms_shown))
            flagged = self._anomaly_columns(snap.atoms, self.atoms_shown)
            if len(flagged["x"]):
                self.anomaly_source.stream(flagged)
        self.atoms_shown = n

    def _atom_columns(self, atoms: dict, start: int = 0) -> dict[str, np.ndarray]:
        """Atom table rows from ``start`` as plot columns (pixel (r, c) spans [c, c+1) × [r, r+1))."""
        pos = np.asarray(atoms["positions"], np.float64)[start:]
        kind = np.asarray(atoms["species"], np.int64)[start:]
        colours = np.array(species_colours(self.species_names) + [UNKNOWN_COLOUR])
        names = np.array(self.species_names + ["unknown"])
        known = (kind >= 0) & (kind < len(self.species_names))
        pick = np.where(known, kind, len(self.species_names))
        return {"x": (pos[:, 1] + 0.5) * self.s, "y": (pos[:, 0] + 0.5) * self.s,
                "confidence": np.asarray(atoms["confidence"], np.float64)[start:],
                "colour": colours[pick].tolist(), "species": names[pick].tolist()}

    def _anomaly_columns(self, atoms: dict, start: int = 0) -> dict[str, np.ndarray]:
        """The flagged columns from ``start`` on (point-defect score above the card's level)."""
        flagged = np.asarray(atoms["anomaly_flag"], bool)[start:]
        pos = np.asarray(atoms["positions"], np.float64)[start:][flagged]
        return {"x": (pos[:, 1] + 0.5) * self.s, "y": (pos[:, 0] + 0.5) * self.s,
                "score": np.asarray(atoms["anomaly"], np.float64)[start:][flagged]}

    def _doubt_mask(self, snap) -> np.ndarray:
        """1 where a block's thickness is doubtful, NaN elsewhere (drawn transparent)."""
        mask = np.where(doubtful(snap.maps, list(snap.flag_names)), 1.0, np.nan)
        return downsample(mask, self.factor) if self.factor > 1 else mask

    def _histogram(self, derived: dict | None = None) -> None:
        """Histogram of the chosen map (``derived``: the maps already computed for this draw)."""
        derived = derived if derived is not None else derived_maps(self.feed.snapshot.maps)
        values = derived[self.hist_map.value]
        finite = values[np.isfinite(values)]
        title = f"Histogram: {MAP_BY_KEY[self.hist_map.value].title}"
        if self.hist_fig.title.text != title:
            self.hist_fig.title.text = title
        if finite.size == 0:
            self.hist_source.data = {"left": [], "right": [], "top": []}
            return
        counts, edges = np.histogram(finite, bins=40)
        self.hist_source.data = {"left": edges[:-1], "right": edges[1:], "top": counts}

    def _status(self, snap) -> None:
        if snap is None:
            where = getattr(self.feed, "req_address", "")
            err = getattr(self.feed, "error", "")
            self.status.text = (f"<b>Waiting for the acquisition engine</b> at {where}: it has not answered yet"
                                + (f" ({err})" if err else "") + ". The page fills in as soon as it does.")
            return
        now = time.monotonic()
        if now - self._status_at < STATUS_S and snap.status.get("state", "running") == "running":
            return  # a changed text re-lays the page out in the browser: twice a second is enough
        self._status_at = now
        # frames/s between the changes of the frame count seen in the last RATE_S: LiberTEM-live
        # hands frames over a partition (a scan row of blocks) at a time, so a rate over a fixed
        # short window swings between 0 and a burst; between changes it is what the scan achieves
        seen = int(snap.status.get("frames_seen", 0))
        if seen and (not self._rate or seen != self._rate[-1][1]):  # from the first frames on
            self._rate = [(t, n) for t, n in self._rate if now - t <= RATE_S] + [(now, seen)]
        rate = quiet = None
        if len(self._rate) > 1:
            (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
            rate = (n1 - n0) / (t1 - t0) if t1 - t0 >= 0.5 else None
            quiet = now - t1  # seconds since the count last grew
        text = status_text(snap.status, self.browser_delay_s, len(snap.atoms["positions"]),
                           getattr(self.feed, "connected", True), getattr(self.feed, "error", ""),
                           frame_delay_s=self.frame_delay_s, recent_fps=rate, quiet_s=quiet)
        if text != self.status.text:
            self.status.text = text

    # -- the chosen block and region -------------------------------------------------------------
    def _block_at(self, x: float, y: float) -> tuple[int, int] | None:
        i, j = int(y // (self.block[0] * self.s)), int(x // (self.block[1] * self.s))
        ny, nx = self.feed.snapshot.done.shape
        return (i, j) if 0 <= i < ny and 0 <= j < nx else None

    def _on_tap(self, event) -> None:
        if event.x is None or event.y is None:
            return
        block = self._block_at(event.x, event.y)
        if block is not None:
            self.chosen = block
            self.show_block(*block)

    def _show_latest(self, snap, force: bool = False) -> None:
        """Follow the newest block, at most once per FOLLOW_S and once no block came for
        FOLLOW_QUIET_S (or FOLLOW_MAX_S passed): the pattern is for the eye, and every fetch is a
        request to the engine, a library fit here and new images to the browser."""
        latest = getattr(self.feed, "latest_block", None)
        if latest is None and snap.done.any():
            latest = tuple(int(v) for v in np.argwhere(snap.done)[-1])
        now = time.monotonic()
        # between bursts of blocks: the fetch, the library fit and four images redrawn would hold
        # up the maps' next update (measured: 90th percentile frame -> pixel 1.0-1.8 s with, 0.8-0.9 s without)
        due = self._shown is None or (now - self._followed_at >= FOLLOW_S and (
            now - self._blocks_sent_at >= FOLLOW_QUIET_S or now - self._followed_at >= FOLLOW_MAX_S))
        if latest is not None and latest != self._shown and (force or due):
            self._followed_at = now
            self._request(latest, pinned=False)

    def show_block(self, i: int, j: int) -> None:
        """Pin the PACBED panel to block (i, j): fetched off the event loop, drawn on the next tick."""
        self.chosen = (i, j)
        self._request((i, j), pinned=True)

    def _request(self, block: tuple[int, int], pinned: bool) -> None:
        self._wanted = (block, pinned)
        self._shown = block
        if not self._busy:
            self._busy = True
            self._pool.submit(self._fetch, block, pinned)

    def _fetch(self, block: tuple[int, int], pinned: bool) -> None:
        """Worker thread: the (possibly slow) request; the document is touched only on the next tick."""
        try:
            result, error = self.feed.block_pacbed(*block), None
        except (TimeoutError, ValueError, OSError, KeyError) as exc:
            result, error = None, exc
        self.doc.add_next_tick_callback(partial(self._together, self._arrived, block, pinned, result, error))

    def _arrived(self, block, pinned, result, error) -> None:
        self._busy = False
        if self._wanted != (block, pinned):  # the operator asked for another meanwhile
            self._request(*self._wanted)
            return
        if error is not None:
            self.pacbed.info.text = f"block {block}: {error}"
            return
        header, pac = result
        self.pacbed.show(block, pinned, header, pac, block_text(*block, header, self.flag_names))
        by, bx = (b * self.s for b in self.block)  # outlined on every map with the pattern shown
        i, j = block
        self.chosen_source.data = {"left": [j * bx], "right": [(j + 1) * bx], "top": [i * by],
                                   "bottom": [(i + 1) * by]}

    # -- the operator's rings ----------------------------------------------------------------------
    def _ring_changed(self, key: str) -> None:
        """A slider let go: that ring is this session's from now on; ask for its image."""
        self.own_rings.add(key)
        self._ring_title(key)
        self._ask_rings()

    def _ring_title(self, key: str) -> None:
        e = self.virtual.get(key)
        if e is not None:
            e["figure"].title.text = f"{self.rings.words(key)} [counts]"

    def _ask_rings(self) -> None:
        """Ask for every ring this session set, off the event loop (latest wins: a change while a
        request is out is asked for when it returns)."""
        if self._ring_busy:
            self._ring_again = True
            return
        rings = {k: self.rings.spec(k) for k in sorted(self.own_rings) if k in self.rings.sliders}
        if not rings:
            return
        self._ring_busy, self._ring_again, self._ring_stale = True, False, False
        self._ring_asked_at = time.monotonic()
        self._ring_pool.submit(self._fetch_rings, rings)

    def _fetch_rings(self, rings: dict) -> None:
        """Worker thread: the request; the document is touched only on the next tick."""
        try:
            result, error = self.feed.ring_images(rings), None
        except (TimeoutError, ValueError, OSError, KeyError) as exc:
            result, error = None, exc
        self.doc.add_next_tick_callback(partial(self._together, self._rings_arrived, rings, result, error))

    def _rings_arrived(self, rings: dict, result, error) -> None:
        self._ring_busy = False
        if error is not None:
            self.rings.info.text = f"rings not updated: {error}"
        else:
            header, images = result
            for key, img in images.items():
                e = self.virtual.get(key)
                if e is None:
                    continue
                img = np.asarray(img, np.float64)
                self.ring_images[key] = img
                e["source"].data = {"image": [downsample(img, e["factor"])]}
                if e["auto"]:
                    e["mapper"].low, e["mapper"].high = auto_range(img, "sequential")
            done = sum(np.isfinite(v).sum() for v in images.values()) // max(len(images), 1)
            self.rings.info.text = (f"{len(images)} ring image(s) from the {header.get('source', 'engine')}, "
                                    f"{done} of {int(np.prod(self.feed.snapshot.scan_shape))} scan points recorded")
            self._rings_drawn += 1
            self.rings_drawn.data = {"msg": [json.dumps({"n": self._rings_drawn,
                                                         "rings": {k: list(v[:2]) for k, v in rings.items()}})]}
        if self._ring_again:
            self._ask_rings()

    def _on_select(self, event) -> None:
        g = event.geometry
        if g.get("type") != "rect":
            return
        x0, x1 = sorted((g["x0"], g["x1"]))
        y0, y1 = sorted((g["y0"], g["y1"]))
        snap = self.feed.snapshot
        by, bx = (b * self.s for b in self.block)
        ny, nx = snap.done.shape
        i0, i1 = max(0, int(y0 // by)), min(ny, int(math.ceil(y1 / by)))
        j0, j1 = max(0, int(x0 // bx)), min(nx, int(math.ceil(x1 / bx)))
        r0, r1 = max(0, int(y0 // self.s)), min(snap.scan_shape[0], int(math.ceil(y1 / self.s)))
        c0, c1 = max(0, int(x0 // self.s)), min(snap.scan_shape[1], int(math.ceil(x1 / self.s)))
        with self.feed.lock:
            derived = derived_maps(snap.maps)
            crystal = np.asarray(snap.maps["tilt_crystal_mrad"][i0:i1, j0:j1], np.float64).reshape(-1, 2)
            detector = np.asarray(snap.maps["tilt_mrad"][i0:i1, j0:j1], np.float64).reshape(-1, 2)
            virtual = {k: np.asarray(v, np.float64) for k, v in snap.virtual.items()}
        virtual.update({k: np.asarray(v, np.float64) for k, v in self.ring_images.items()})
        if i1 <= i0 or j1 <= j0:
            self.region_info.text = "the selected region holds no block"
            return
        stats = region_stats(derived, [(m.key, m.title, m.unit) for m in MAPS if m.kind != "cyclic"],
                             slice(i0, i1), slice(j0, j1))
        stats += region_stats(virtual, [(k, t, "counts") for k, t in (*VIRTUAL, ("custom", "custom annulus"))
                                        if k in virtual],
                              slice(r0, r1), slice(c0, c1))

        def num(v):
            return "—" if not math.isfinite(v) else f"{v:.3g}"

        table = "".join(f"<tr><td>{s.title}</td><td>{num(s.mean)} ± {num(s.sd)} {s.unit}</td><td>{s.count}</td></tr>"
                        for s in stats)
        ok = np.isfinite(crystal).all(axis=1)
        correction = crystal_correction(crystal[ok].mean(axis=0)) if ok.any() else "no analysed blocks"
        ok = np.isfinite(detector).all(axis=1)
        if self.holder_axis is not None and ok.any():
            correction += "<br><span class='holder'>" + holder_text(detector[ok].mean(axis=0), self.holder_axis) + "</span>"
        self.region_info.text = (f"<b>Region</b> blocks {i0}–{i1 - 1} × {j0}–{j1 - 1}:"
                                 f"<table class='region'><tr><th>map</th><th>mean ± sd</th><th>count</th></tr>"
                                 f"{table}</table>{correction}")


def make_document(doc, feed, holder_axis_deg: float | None = None) -> Page:
    """One browser session's page on ``feed`` (``holder_axis_deg``: `stemlive dashboard --holder-axis-deg`)."""
    return Page(doc, feed, holder_axis_deg)
