"""Every control of the dashboard clicked in a real browser, each checked for its effect.

Shared by the live browser test (tests/test_dashboard_browser.py) and the store-view test; the
page must be fully drawn (scan complete) when `exercise_controls` starts.
"""
from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import numpy as np

from . import browser as br

LOOKS = ("background_fill_color", "border_fill_color", "outline_line_color", "title.text_color")


def _looks(d, figures):
    return {(f, p): br.model_prop(d, f, p) for f in figures for p in LOOKS}


def _wait_file(folder: Path, pattern: str, timeout: float = 30.0) -> Path:
    def found():
        done = [p for p in folder.glob(pattern) if not p.name.endswith(".crdownload") and p.stat().st_size > 0]
        return done[0] if done else None
    return br.wait_for(found, timeout, what=f"a download {pattern} in {folder}")


def show_tab(d, tabs: str, index: int, figure: str) -> None:
    """Click tab ``index`` of the Tabs ``tabs``; wait until ``figure`` on it is on show and painted."""
    br.click_widget(d, tabs, ".bk-tab", index)
    br.wait_for(lambda: br.model_prop(d, tabs, "active") == index, 10, what=f"tab {index} of {tabs} active")
    br.wait_for(lambda: d.execute_script(
        "const v = Bokeh.index.find_one(Bokeh.documents[0].get_model_by_name(arguments[0]));"
        "return v != null && v.is_displayed && v.el.getBoundingClientRect().width > 0", figure), 10,
        what=f"{figure} shown")
    assert br.model_prop(d, figure, "hold_render") is False


def hidden_tabs_hold(d) -> None:
    """The maps of tabs not on show hold their render (a hidden Bokeh plot still repaints)."""
    active = br.model_prop(d, "map-tabs", "active")
    shown = {0: "map-thickness", 1: "map-tilt1", 2: "map-flags"}
    for k, name in shown.items():
        assert br.model_prop(d, name, "hold_render") is (k != active), (name, active)


def exercise_controls(d, store: dict, downloads: Path, holder_axis_deg: float | None = None) -> None:
    """Click every control; ``store``: `read_store` of the finished run the page shows;
    ``holder_axis_deg``: the page's holder axis (region statistics then give α/β)."""
    maps, attrs = store["maps"], store["attrs"]
    step = float(attrs["scan_step_nm"]) if math.isfinite(float(attrs["scan_step_nm"])) else 1.0
    by, bx = (int(v) * step for v in attrs["block_shape"])
    br.allow_downloads(d, downloads)

    # colour range: auto shows the data range; fixed takes typed values; auto again restores
    br.choose(d, "range-map", "tilt0")
    t0 = maps["tilt_mrad"][..., 0]
    want = float(np.nanmax(np.abs(t0)))
    br.wait_for(lambda: abs(br.model_prop(d, "range-high", "value") - want) < 1e-3 * max(1, want),
                10, what="the spinners showing tilt0's auto range")
    assert br.model_prop(d, "mapper-tilt0", "high") == br.model_prop(d, "range-high", "value")
    br.click_widget(d, "range-mode", "button", 1)  # fixed
    br.type_number(d, "range-low", -0.25)
    br.type_number(d, "range-high", 0.5)
    br.wait_for(lambda: (br.model_prop(d, "mapper-tilt0", "low"), br.model_prop(d, "mapper-tilt0", "high"))
                == (-0.25, 0.5), 10, what="the fixed range applied to the tilt0 map")
    br.choose(d, "range-map", "thickness")  # another map: its own (auto) range and mode
    br.wait_for(lambda: br.model_prop(d, "range-mode", "active") == 0, 10, what="thickness still auto")
    assert br.model_prop(d, "mapper-tilt0", "low") == -0.25  # tilt0 keeps its fixed range
    br.choose(d, "range-map", "tilt0")
    br.wait_for(lambda: br.model_prop(d, "range-mode", "active") == 1, 10, what="tilt0 shown as fixed")
    br.click_widget(d, "range-mode", "button", 0)  # auto again
    br.wait_for(lambda: abs(br.model_prop(d, "mapper-tilt0", "high") - want) < 1e-3 * max(1, want), 10,
                what="tilt0 back on its data range")

    # CSV: every block, the store's values, flags by name
    br.click_widget(d, "download")
    path = _wait_file(downloads, "stemlive-maps*.csv")
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == maps["thickness_nm"].size
    got = np.array([float(r["thickness_nm"]) if r["thickness_nm"] else np.nan for r in rows])
    np.testing.assert_allclose(got, maps["thickness_nm"].ravel(), rtol=1e-5)

    # PNG: the save tool of the map grid
    br.tool_button(d, "map-thickness", "SaveTool").click()
    png = _wait_file(downloads, "*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # theme: dark darkens the page and the plots; light gives back the first look exactly
    figs = ["map-thickness", "map-tilt0", "pacbed", "histogram"]
    first = _looks(d, figs)
    body = d.execute_script("return getComputedStyle(document.body).backgroundColor")
    br.click_widget(d, "theme", "button", 1)
    br.wait_for(lambda: d.execute_script("return getComputedStyle(document.body).backgroundColor") != body, 10,
                what="a dark page")
    br.wait_for(lambda: all(br.model_prop(d, f, "border_fill_color") != first[(f, "border_fill_color")] for f in figs),
                10, what="dark plots")
    br.click_widget(d, "theme", "button", 0)
    br.wait_for(lambda: _looks(d, figs) == first, 10, what="the first look restored")
    assert d.execute_script("return getComputedStyle(document.body).backgroundColor") == body

    # histogram of another map
    br.choose(d, "histogram-map", "tilt1")
    br.wait_for(lambda: "Tilt t1" in (br.model_prop(d, "histogram", "title.text") or ""), 10, what="tilt1 histogram")
    tops = br.wait_for(lambda: d.execute_script(
        "return Array.from(Bokeh.documents[0].get_model_by_name('source-histogram').data.top)"), 10)
    assert sum(tops) == int(np.isfinite(maps["tilt_mrad"][..., 1]).sum())

    # overlays: atoms off at first, on when ticked; doubtful blocks on at first, off when unticked
    names = [n for n in ("atoms-bf", "atoms-abf", "atoms-adf", "atoms-haadf") if br.model_prop(d, n, "visible") is not None]
    assert names and not any(br.model_prop(d, n, "visible") for n in names)
    br.click_widget(d, "show-atoms", "input")
    br.wait_for(lambda: all(br.model_prop(d, n, "visible") for n in names), 10, what="the atom overlay shown")
    # coloured by species (where the run classified its columns), with the legend; anomalous
    # columns on their own tick
    assert br.model_prop(d, "atom-legend", "visible")
    legend = br.model_prop(d, "atom-legend", "text")
    colours = d.execute_script("return Array.from(Bokeh.documents[0].get_model_by_name('source-atoms').data.colour)")
    species = store.get("atoms", {}).get("species_names")
    if species:
        assert all(name in legend for name in species)
        assert len(set(colours)) >= 2, set(colours)  # cation columns of two kinds at least
    else:
        assert "atomic column" in legend and len(set(colours)) <= 1
    anomalies = [n.replace("atoms-", "anomalies-") for n in names]
    assert not any(br.model_prop(d, n, "visible") for n in anomalies)
    br.click_widget(d, "show-atoms", "input", 1)
    br.wait_for(lambda: all(br.model_prop(d, n, "visible") for n in anomalies), 10, what="the anomaly overlay shown")
    assert br.model_prop(d, "doubt", "visible")
    br.click_widget(d, "show-doubt", "input")
    br.wait_for(lambda: br.model_prop(d, "doubt", "visible") is False, 10, what="the doubt hatching hidden")
    br.click_widget(d, "show-doubt", "input")

    # map tabs: each shows (draws) its own maps; the tilt components for the block click
    hidden_tabs_hold(d)
    for index, shown in ((2, "map-flags"), (1, "map-tilt1")):
        show_tab(d, "map-tabs", index, shown)
        hidden_tabs_hold(d)

    # block click: the panel pins to it, outlines it on every map; "follow latest" lets go
    i, j = 1, 2
    br.click_data_point(d, "map-tilt1", (j + 0.5) * bx, (i + 0.5) * by)
    br.wait_for(lambda: f"pinned to block ({i}, {j})" in (br.model_prop(d, "pacbed", "title.text") or ""), 20,
                what="the panel pinned to the clicked block")
    outline = d.execute_script("const s = Bokeh.documents[0].get_model_by_name('source-chosen').data;"
                               "return [s.left[0], s.top[0], s.right[0], s.bottom[0]]")
    np.testing.assert_allclose(outline, [j * bx, i * by, (j + 1) * bx, (i + 1) * by], rtol=1e-6)
    info = br.text_of(d, "pacbed-info")
    assert f"thickness {maps['thickness_nm'][i, j]:.1f} ± {maps['thickness_sigma_nm'][i, j]:.1f} nm" in info
    assert "mrad" in br.model_prop(d, "pacbed", "below.0.axis_label")
    # beside it: the library's fitted pattern and the difference for a checked block, else why not
    checked = int(maps["method"][i, j]) == 2
    fit_text = br.wait_for(lambda: (lambda t: t if ("Library fit" in t) == checked and "fit" in t else None)(
        br.text_of(d, "pacbed-fit-info")), 20, what="the library fit (or why none) for the pinned block")
    if checked:
        assert f"thickness {maps['thickness_nm'][i, j]:.1f} nm" in fit_text, fit_text
        diff = np.array(br.model_data(d, "source-pacbed-difference"), float)
        assert diff.shape == (64, 64) and np.isfinite(diff).sum() > 1000
        assert br.model_prop(d, "pacbed-difference", "below.0.axis_label").startswith("mrad, [010] →")
    else:
        assert "No library fit" in fit_text and br.model_data(d, "source-pacbed-fit") is None, fit_text
    # log (default) -> gamma: the drawn pattern goes to [0, 1]
    br.click_widget(d, "pacbed-scale", "button", 2)
    br.wait_for(lambda: (lambda v: v is not None and min(x for r in v for x in r if x is not None) == 0
                         and max(x for r in v for x in r if x is not None) == 1)(br.model_data(d, "source-pacbed")),
                10, what="the gamma display")
    if checked:  # the library fit on the same scale
        br.wait_for(lambda: (lambda v: v is not None and max(x for r in v for x in r if x is not None) == 1)(
            br.model_data(d, "source-pacbed-fit")), 10, what="the library fit on the gamma scale")
    br.click_widget(d, "pacbed-follow")
    br.wait_for(lambda: "following the latest block" in (br.model_prop(d, "pacbed", "title.text") or ""), 20,
                what="follow latest")

    # box select on a map: mean ± sd and count of every map in the region
    show_tab(d, "map-tabs", 0, "map-thickness")
    br.tool_button(d, "map-thickness", "BoxSelectTool").click()
    br.drag(d, "map-thickness", (0.2 * bx, 0.2 * by), (2.8 * bx, 1.8 * by))
    text = br.wait_for(lambda: (lambda t: t if "Region" in t else None)(br.text_of(d, "region-info")), 20,
                       what="region statistics")
    region = maps["thickness_nm"][0:2, 0:3]
    region = region[np.isfinite(region)]
    assert f"<td>Thickness</td><td>{region.mean():.3g} ± {region.std(ddof=1):.3g} nm</td><td>{region.size}</td>" in text
    assert "Tilt t0" in text and "HAADF" in text and "zone axis" in text
    tilt = maps["tilt_mrad"][0:2, 0:3].reshape(-1, 2)
    tilt = tilt[np.isfinite(tilt).all(axis=1)].mean(axis=0)
    if holder_axis_deg is not None:  # the correction as holder α/β, DESIGN.md's tilt and the axis angle
        p = math.radians(holder_axis_deg)
        da = tilt @ [math.cos(p), -math.sin(p)]
        db = tilt @ [math.sin(p), math.cos(p)]
        assert f"tilt α by {da:+.2f} mrad" in text and f"β by {db:+.2f} mrad" in text, text
    else:
        assert "holder" not in text
    # any map: a box on the tilt azimuth map gives the thickness of its own region
    # (the grid's merged box-select button is still on: another click would turn it off)
    br.drag(d, "map-tilt_azimuth", (1.2 * bx, 0.2 * by), (2.8 * bx, 2.8 * by))
    region = maps["thickness_nm"][0:3, 1:3]
    region = region[np.isfinite(region)]
    want = f"<td>Thickness</td><td>{region.mean():.3g} ± {region.std(ddof=1):.3g} nm</td><td>{region.size}</td>"
    br.wait_for(lambda: want in br.text_of(d, "region-info"), 20, what="region statistics from the azimuth map")
    if br.model_prop(d, "com-grid", "name") is not None:  # the centre-of-mass tab and back
        show_tab(d, "detector-tabs", 1, "map-idpc")
        show_tab(d, "detector-tabs", 0, "map-haadf" if br.model_prop(d, "map-haadf", "name") else "map-custom")
    if "radial" in store:
        exercise_rings(d, store)
    time.sleep(0.5)
    assert br.console_errors(d) == []


def store_ring(store: dict, inner: float, outer: float, unit: str) -> np.ndarray:
    """A ring image as README's store layout says to make it: the per-frame profiles times the
    weight of each bin (1 inside, the covered fraction at an edge), radii in px from α or mrad."""
    r, a = store["radial"], store["attrs"]
    alpha, mpp = float(a["alpha_mrad"]), float(a["mrad_per_px"])
    radius = r["radius_px"] if math.isfinite(r["radius_px"]) else alpha / mpp
    px = {"alpha": radius, "mrad": radius / alpha, "px": 1.0}[unit]
    b = np.arange(r["profiles"].shape[-1])
    w = np.clip(outer * px / r["bin_px"] - b, 0, 1) - np.clip(inner * px / r["bin_px"] - b, 0, 1)
    return r["profiles"].astype(np.float64) @ w


def ring_slider_to(d, store: dict, key: str, handle: int, share: float, what: str) -> float:
    """Drag one handle of ring ``key``'s slider to ``share`` of the way from its inner to its outer
    radius, wait until the image shows the store's values for the ring the slider then says;
    returns the page's own slider-to-redrawn delay (s)."""
    before = br.model_prop(d, f"ring-{key}", "value")
    start, end = br.model_prop(d, f"ring-{key}", "start"), br.model_prop(d, f"ring-{key}", "end")
    target = before[0] + share * (before[1] - before[0])
    n = len(d.execute_script("return window.stemliveRingDelays || []"))
    br.drag_slider(d, f"ring-{key}", handle, (target - start) / (end - start))
    value = br.wait_for(lambda: (lambda v: v if v and list(v) != list(before) else None)(
        br.model_prop(d, f"ring-{key}", "value_throttled")), 10, what=f"the {key} slider moved ({what})")
    unit = ("mrad", "alpha")[br.model_prop(d, "ring-unit", "active")]
    want = store_ring(store, *value, unit)

    def shown():
        got = br.model_data(d, f"source-{key}")
        if got is None:
            return None
        got = np.array(got, float)
        return got.shape == want.shape and np.allclose(got, want, rtol=1e-4, equal_nan=True)

    br.wait_for(shown, 20, every=0.05, what=f"the {key} image for {value} {unit} ({what})")
    delays = br.wait_for(lambda: (lambda v: v if len(v) > n else None)(
        d.execute_script("return window.stemliveRingDelays || []")), 10, what="the redraw delay noted")
    title = br.model_prop(d, f"map-{key}", "title.text")
    assert "mrad" in title and "α" in title, title
    return float(delays[-1])


def exercise_rings(d, store: dict) -> list[float]:
    """Every ring slider's both handles and the unit toggle; each image checked against the ring
    summed from the store's profiles; prints the delays (slider let go -> image redrawn)."""
    keys = [k for k in ("bf", "abf", "adf", "haadf", "custom") if br.model_prop(d, f"ring-{k}", "value") is not None]
    assert "custom" in keys and len(keys) >= 3
    delays = []
    for k, key in enumerate(keys):  # in mrad
        delays.append(ring_slider_to(d, store, key, 1, 0.8 - 0.05 * k, "outer, mrad"))
    br.click_widget(d, "ring-unit", "button", 1)  # α: the sliders convert, the rings stay
    br.wait_for(lambda: br.model_prop(d, "ring-haadf" if "haadf" in keys else "ring-custom", "end") < 20, 10,
                what="the sliders in α")
    for k, key in enumerate(keys):
        delays.append(ring_slider_to(d, store, key, 0, 0.2 + 0.05 * k, "inner, α"))
    print(f"ring slider let go -> image redrawn in the browser: {len(delays)} changes, median "
          f"{np.median(delays) * 1e3:.0f} ms, max {max(delays) * 1e3:.0f} ms", flush=True)
    assert max(delays) < 5.0, delays  # the target is < 1 s; a loaded test machine gets slack
    return delays
