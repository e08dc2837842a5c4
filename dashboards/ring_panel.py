"""The virtual-detector panel: inner/outer radius of each ring (BF, ABF, ADF, HAADF and a custom
annulus) on range sliders, in mrad or in units of the convergence semi-angle α.

Only widgets and numbers live here; the page (`app.Page`) asks the feed for the images of the
rings the operator set.  Radii are kept in α (mrad = α · ``alpha_mrad``, the relation the
engine's ring scale keeps: its disk radius is α in px and its mrad per px α over that radius),
so switching the unit converts the sliders without moving a ring.
"""
from __future__ import annotations

from bokeh.layouts import column
from bokeh.models import CustomJS, Div, RadioButtonGroup, RangeSlider

from ..protocol.rings import positive_or_none
from ..udf.radial_bins import DEFAULT_RINGS

LABELS = {"bf": "BF", "abf": "ABF", "adf": "ADF", "haadf": "HAADF", "custom": "Custom"}
CUSTOM_ALPHA = (1.0, 2.0)  # the custom annulus at first: just outside the zero disk
UNITS = ("mrad", "alpha")  # the unit toggle's buttons, in order
STEP = {"mrad": 0.1, "alpha": 0.01}


def ring_alpha(spec, alpha_mrad: float | None, radius_px: float | None) -> tuple[float, float] | None:
    """(inner, outer) in α of a ring given as (inner, outer, unit); None if its unit cannot be converted."""
    inner, outer, unit = spec
    f = {"alpha": 1.0, "mrad": 1 / alpha_mrad if alpha_mrad else None,
         "px": 1 / radius_px if radius_px else None}.get(unit)
    return None if f is None else (float(inner) * f, float(outer) * f)


def ring_words(lo_alpha: float, hi_alpha: float, alpha_mrad: float | None) -> str:
    """A ring in both units: "6.8–13.6 mrad (0.50–1.00 α)" (α alone without a known α in mrad)."""
    a = f"{lo_alpha:.2f}–{hi_alpha:.2f} α"
    if not alpha_mrad:
        return a
    return f"{lo_alpha * alpha_mrad:.1f}–{hi_alpha * alpha_mrad:.1f} mrad ({a})"


class RingPanel:
    """One RangeSlider per ring (name ``ring-<key>``) and the unit toggle (``ring-unit``).

    ``on_change(key)`` is called when the operator lets go of a slider (``value_throttled``: one
    request per gesture, not one per pixel dragged)."""

    def __init__(self, keys: list[str], meta: dict, on_change, width: int = 280):
        self.alpha_mrad = positive_or_none(meta.get("alpha_mrad"))
        radial = meta.get("radial") or {}
        radius = positive_or_none(radial.get("radius_px"))
        run_rings = {**DEFAULT_RINGS, **(meta.get("rings") or {})}
        self.alpha: dict[str, tuple[float, float]] = {}  # each ring in α, as the sliders show it
        for key in keys:
            got = ring_alpha(run_rings[key], self.alpha_mrad, radius) if key in run_rings else None
            self.alpha[key] = got or (ring_alpha(DEFAULT_RINGS[key], None, None) if key in DEFAULT_RINGS
                                      else CUSTOM_ALPHA)
        # the sliders reach the frame's edge (the last radial bin) where that is known
        edge = positive_or_none(radial.get("n_bins")) and positive_or_none(radial.get("bin_px"))
        max_alpha = radial["n_bins"] * radial["bin_px"] / radius if edge and radius else 6.0
        self.max_alpha = max(max_alpha, *(hi for _, hi in self.alpha.values()))
        self.unit = "mrad" if self.alpha_mrad else "alpha"
        self.sliders: dict[str, RangeSlider] = {}
        self.on_change = on_change
        asked = CustomJS(code="""window.stemliveRingAsked = {name: cb_obj.name.slice(5),
            value: Array.from(cb_obj.value_throttled), t: performance.now()};""")
        for key in keys:
            s = RangeSlider(start=0, end=1, value=(0, 1), step=0.01, width=width, show_value=False,
                            name=f"ring-{key}", title="")
            s.on_change("value", lambda attr, old, new, key=key: self._title(key))
            s.on_change("value_throttled", lambda attr, old, new, key=key: self._let_go(key, new))
            s.js_on_change("value_throttled", asked)
            self.sliders[key] = s
        self.unit_toggle = RadioButtonGroup(labels=["mrad", "α"], active=UNITS.index(self.unit),
                                            name="ring-unit", disabled=not self.alpha_mrad)
        self.unit_toggle.on_change("active", lambda attr, old, new: self.set_unit(UNITS[new]))
        self.info = Div(text="", width=width, name="ring-info")
        self._show_all()

    def layout(self):
        return column(Div(text="<b>Virtual detectors</b>: inner/outer radius of each ring"), self.unit_toggle,
                      *self.sliders.values(), self.info)

    def factor(self) -> float:
        """Slider units per α."""
        return self.alpha_mrad if self.unit == "mrad" else 1.0

    def spec(self, key: str) -> tuple[float, float, str]:
        """The ring as the slider shows it, (inner, outer, unit): what the page asks for."""
        lo, hi = self.sliders[key].value
        return float(lo), float(hi), self.unit

    def words(self, key: str) -> str:
        return f"{LABELS.get(key, key)} {ring_words(*self.alpha[key], self.alpha_mrad)}"

    def set_unit(self, unit: str) -> None:
        """Show every slider in ``unit``; the rings stay where they are."""
        self.unit = unit
        self._show_all()

    def _show_all(self) -> None:
        f = self.factor()
        for key, s in self.sliders.items():
            lo, hi = self.alpha[key]
            s.update(start=0.0, end=round(self.max_alpha * f, 2), step=STEP[self.unit],
                     value=(round(lo * f, 4), round(hi * f, 4)))
            self._title(key)

    def _title(self, key: str) -> None:
        lo, hi = self.sliders[key].value
        f = self.factor()
        title = f"{LABELS.get(key, key)} {ring_words(lo / f, hi / f, self.alpha_mrad)}"
        if self.sliders[key].title != title:
            self.sliders[key].title = title

    def _let_go(self, key: str, value) -> None:
        lo, hi = (float(v) for v in value)
        if not hi > lo:  # both handles at one radius: no ring
            self.info.text = f"{LABELS.get(key, key)}: the outer radius must exceed the inner one"
            return
        f = self.factor()
        self.alpha[key] = (lo / f, hi / f)
        self.on_change(key)
