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

    px, py = data_to_screen(driver, figure_name, x, y)
    actions = ActionBuilder(driver)
    actions.pointer_action.move_to_location(int(px), int(py)).click()
    actions.perform()
    ActionChains(driver).reset_actions()


def widget_element(driver, name: str, selector: str, index: int = 0):
    """An element inside a Bokeh widget's shadow DOM (by the widget's model name), scrolled into view."""
    el = driver.execute_script("""
        const m = Bokeh.documents[0].get_model_by_name(arguments[0]);
        if (!m) return null;
        const v = [...Bokeh.index.all_views()].find(v => v.model === m);
        if (!v) return null;
        const els = (v.shadow_el || v.el).querySelectorAll(arguments[1]);
        const el = els[arguments[2]] || null;
        if (el) el.scrollIntoView({block: "center"});
        return el;""", name, selector, index)
    if el is None:
        raise LookupError(f"no {selector!r} #{index} in the widget named {name!r}")
    return el


def click_widget(driver, name: str, selector: str = "button", index: int = 0) -> None:
    widget_element(driver, name, selector, index).click()


def choose(driver, name: str, value: str) -> None:
    """Pick an option of a Bokeh Select by its value, as a user would."""
    from selenium.webdriver.support.ui import Select

    label = driver.execute_script("""
        const m = Bokeh.documents[0].get_model_by_name(arguments[0]);
        const o = m.options.find(o => (Array.isArray(o) ? o[0] : o) == arguments[1]);
        return o === undefined ? null : (Array.isArray(o) ? o[1] : o);""", name, value)
    if label is None:
        raise LookupError(f"the Select {name!r} has no option {value!r}")
    Select(widget_element(driver, name, "select")).select_by_visible_text(label)


def type_number(driver, name: str, value: float) -> None:
    """Type a number into a Bokeh Spinner/NumericInput and press Enter."""
    from selenium.webdriver.common.keys import Keys

    el = widget_element(driver, name, "input")
    el.click()
    el.send_keys(Keys.END)
    el.send_keys(*([Keys.BACKSPACE] * len(el.get_attribute("value") or "")))
    el.send_keys(str(value), Keys.ENTER)


def tool_button(driver, figure_name: str, tool_type: str):
    """The toolbar button of a figure's tool (merged gridplot toolbars included)."""
    el = driver.execute_script("""
        const fig = Bokeh.documents[0].get_model_by_name(arguments[0]);
        const mine = new Set(fig.toolbar.tools.filter(t => t.type == arguments[1]));
        const owns = t => t && (mine.has(t) || (t.tools || []).some(u => mine.has(u)));
        const buttons = [...Bokeh.index.all_views()].filter(v => v.model.tool !== undefined && owns(v.model.tool));
        if (!buttons.length) {  // a merged save tool: the one of the toolbar holding the figure's tools
          const any = [...Bokeh.index.all_views()].filter(v => v.model.tool && v.model.tool.type == arguments[1]
              && v.parent && v.parent.model.tools.some(t => (t.tools || []).some(u => fig.toolbar.tools.includes(u))));
          buttons.push(...any);
        }
        if (!buttons.length) return null;
        buttons[0].el.scrollIntoView({block: "center"});
        return buttons[0].el;""", figure_name, tool_type)
    if el is None:
        raise LookupError(f"no {tool_type} button for the figure {figure_name!r}")
    return el


def data_to_screen(driver, figure_name: str, x: float, y: float) -> tuple[int, int]:
    """Screen pixel of data point (x, y) of a figure, scrolled into view (y0 is at the frame's bottom)."""
    box = driver.execute_script("""
        const m = Bokeh.documents[0].get_model_by_name(arguments[0]);
        const v = Bokeh.index.find_one(m); v.el.scrollIntoView({block: "center"});
        const r = v.el.getBoundingClientRect(); const f = v.frame.bbox;
        return [r.left + f.left, r.top + f.top, f.width, f.height,
                m.x_range.start, m.x_range.end, m.y_range.start, m.y_range.end];""", figure_name)
    left, top, w, h, x0, x1, y0, y1 = box
    return int(left + (x - x0) / (x1 - x0) * w), int(top + (1 - (y - y0) / (y1 - y0)) * h)


def drag(driver, figure_name: str, start: tuple[float, float], end: tuple[float, float]) -> None:
    """A real pointer drag between two data points of a figure (box select, box zoom)."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    (x0, y0), (x1, y1) = data_to_screen(driver, figure_name, *start), data_to_screen(driver, figure_name, *end)
    actions = ActionBuilder(driver)
    p = actions.pointer_action
    p.move_to_location(x0, y0).pointer_down()
    for k in range(1, 6):
        p.move_to_location(x0 + (x1 - x0) * k // 5, y0 + (y1 - y0) * k // 5)
    p.pointer_up()
    actions.perform()


def allow_downloads(driver, folder) -> None:
    """Headless Chromium saves downloads into ``folder`` (CSV and PNG exports)."""
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})


def model_prop(driver, name: str, path: str):
    """A property of a named model as the browser has it (``path`` like "low" or "title.text")."""
    return driver.execute_script("""
        let m = Bokeh.documents[0].get_model_by_name(arguments[0]);
        for (const k of arguments[1].split(".")) { if (m == null) return null; m = m[k]; }
        return m;""", name, path)


def drag_slider(driver, name: str, handle: int, fraction: float) -> None:
    """A real pointer drag of a Bokeh (range) slider's handle to ``fraction`` of its track."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    widget_element(driver, name, ".noUi-handle", handle)  # scrolled into view
    x0, y0, x1 = driver.execute_script("""
        const m = Bokeh.documents[0].get_model_by_name(arguments[0]);
        const v = [...Bokeh.index.all_views()].find(v => v.model === m);
        const root = v.shadow_el || v.el;
        const h = root.querySelectorAll(".noUi-handle")[arguments[1]].getBoundingClientRect();
        const base = root.querySelector(".noUi-base").getBoundingClientRect();
        return [h.left + h.width / 2, h.top + h.height / 2, base.left + arguments[2] * base.width];""",
                                       name, handle, fraction)
    actions = ActionBuilder(driver)
    p = actions.pointer_action
    p.move_to_location(int(x0), int(y0)).pointer_down()
    for k in range(1, 6):
        p.move_to_location(int(x0 + (x1 - x0) * k / 5), int(y0))
    p.pointer_up()
    actions.perform()
