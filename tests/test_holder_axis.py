"""The holder's α axis given to a run: stored, and read by the dashboard for holder α/β."""
from __future__ import annotations

from stemlive.live.store import read_store


def test_holder_axis_reaches_the_store_and_the_page(live_scan, tmp_path):
    """`replay --holder-axis-deg` is stored; the store's page reads it (holder α/β in the region
    statistics) without `stemlive dashboard --holder-axis-deg`."""
    import argparse

    from bokeh.document import Document

    from stemlive.dashboards.app import Page
    from stemlive.dashboards.feed import StoreFeed
    from stemlive.live.commands import add_run_options, settings_from
    from stemlive.live.replay import replay

    d, meta, _, _ = live_scan
    out = tmp_path / "holder.h5"
    ap = argparse.ArgumentParser()
    add_run_options(ap)
    args = ap.parse_args(["--block", "16", "16", "--alpha-mrad", str(meta["alpha_mrad"]), "--kv", str(meta["kv"]),
                          "--mrad-per-px", str(meta["mrad_per_px"]), "--out", str(out), "--no-publish", "--quiet",
                          "--atoms", "off", "--method", "network", "--holder-axis-deg", "-30"])
    settings = settings_from(args)
    assert settings.holder_axis_deg == -30.0 and settings.com is False
    replay(d / "frames.npy", settings)
    assert read_store(out)["attrs"]["holder_axis_deg"] == -30.0
    feed = StoreFeed(out)
    try:
        page = Page(Document(), feed)
        assert page.holder_axis == -30.0
        assert "holder α axis at -30°" in page.models.text
    finally:
        feed.close()
