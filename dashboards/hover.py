"""Hover readouts computed in the browser: the block under the pointer, and the flags of that block
by name (the bits live in one shared source, so no map carries a copy)."""
from __future__ import annotations

from bokeh.models import ColumnDataSource, CustomJSHover

# hover: the block under the pointer and flag names (bits -> names in the browser)
BLOCK_JS = """
if (format == "blk") {
  const i = Math.floor(special_vars.y / by), j = Math.floor(special_vars.x / bx);
  return "(" + i + ", " + j + ")";
}
return value.toFixed(2);"""
FLAGS_JS = """
if (format != "flags") return value.toFixed(2);
const img = src.data.bits[0];
const ny = img.shape ? img.shape[0] : img.length, nx = img.shape ? img.shape[1] : img[0].length;
const i = Math.floor(special_vars.y / by), j = Math.floor(special_vars.x / bx);
if (i < 0 || j < 0 || i >= ny || j >= nx) return "—";
const v = img.shape ? img[i * nx + j] : img[i][j];
if (v == null || Number.isNaN(v)) return "—";
const out = [];
for (let k = 0; k < names.length; k++) { if (Math.floor(v / 2 ** k) % 2 == 1) out.push(names[k]); }
return out.length ? out.join(", ") : "none";"""


def formatters(block_size: tuple[float, float], display_block: tuple[float, float], flag_source: ColumnDataSource,
               flag_names: list[str]) -> dict:
    """``$y{blk}``: "(i, j)"; ``$x{flags}``: the flag names; ``{pos}``: the coordinate itself."""
    by, bx = block_size
    dby, dbx = display_block
    return {"$y": CustomJSHover(args=dict(by=by, bx=bx), code=BLOCK_JS),
            "$x": CustomJSHover(args=dict(src=flag_source, names=list(flag_names), by=dby, bx=dbx), code=FLAGS_JS)}
