"""Headless Debian Chromium for the dashboard tests (no downloads: the system's chromium and chromedriver)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--window-size=1750,1400"]


def available() -> str | None:
    """None when the browser tests can run, else why not."""
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        return "Debian chromium and chromium-driver are not installed (make test installs them)"
    if shutil.which("chromium") is None:
        return "chromium is not on PATH"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the dev extra)"
    return None


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def wait_for(predicate, timeout: float = 60.0, every: float = 0.25, what: str = "condition"):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what} not met within {timeout:.0f} s")


def model_data(driver, name: str, column: str = "image"):
    """A ColumnDataSource column as the browser has it (2D images as nested lists, NaN as None)."""
    return driver.execute_script(
        "if (typeof Bokeh === 'undefined' || !Bokeh.documents.length) return null;"
        "const m = Bokeh.documents[0].get_model_by_name(arguments[0]);"
        "if (!m || !m.data[arguments[1]] || !m.data[arguments[1]].length) return null;"
        "const v = m.data[arguments[1]][0]; const clean = x => Number.isNaN(x) ? null : x;"
        "if (v.shape) { const [ny, nx] = v.shape; const out = [];"
        "  for (let i = 0; i < ny; i++) out.push(Array.from(v.slice(i * nx, (i + 1) * nx), clean));"
        "  return out; }"
        "return Array.from(v, r => Array.from(r, clean));", name, column)


def text_of(driver, name: str) -> str:
    return driver.execute_script(
        "if (typeof Bokeh === 'undefined' || !Bokeh.documents.length) return '';"
        "const m = Bokeh.documents[0].get_model_by_name(arguments[0]); return m ? m.text : ''", name) or ""


def click_data_point(driver, figure_name: str, x: float, y: float) -> None:
    """A real pointer click at data coordinates (x, y) of a figure (flipped y range handled)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    box = driver.execute_script("""
        const m = Bokeh.documents[0].get_model_by_name(arguments[0]);
        const v = Bokeh.index.find_one(m); v.el.scrollIntoView({block: "center"});
        const r = v.el.getBoundingClientRect(); const f = v.frame.bbox;
        return [r.left + f.left, r.top + f.top, f.width, f.height,
                m.x_range.start, m.x_range.end, m.y_range.start, m.y_range.end];""", figure_name)
    left, top, w, h, x0, x1, y0, y1 = box
    px = left + (x - x0) / (x1 - x0) * w
    py = top + (1 - (y - y0) / (y1 - y0)) * h  # y0 is at the bottom of the frame
    actions = ActionBuilder(driver)
    actions.pointer_action.move_to_location(int(px), int(py)).click()
    actions.perform()
    ActionChains(driver).reset_actions()
