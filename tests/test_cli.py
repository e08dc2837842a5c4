import subprocess
import sys

import pytest


def stemlive(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "stemlive.live.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_subcommands():
    res = stemlive("--help")
    assert res.returncode == 0
    for cmd in ("demo", "simulate", "train", "pacbed", "export", "live", "replay", "sim-detector", "reanalyse"):
        assert cmd in res.stdout
    res = stemlive("simulate", "--help")
    assert "pacbed" in res.stdout and "scan" in res.stdout


def test_core_imports_without_torch_or_abtem():
    code = ("import sys; import stemlive.live.cli, stemlive.simulate.scan, stemlive.simulate.library; "
            "bad = [m for m in ('torch', 'abtem') if m in sys.modules]; assert not bad, bad")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_demo_builds_scan_from_shipped_library(tmp_path):
    from stemlive.simulate.scan_cli import SHIPPED_LIBRARY

    if not SHIPPED_LIBRARY.exists():
        pytest.fail(f"shipped demo library missing: {SHIPPED_LIBRARY}")
    args = ("demo", "--headless", "--cache", str(tmp_path), "--scan-shape", "32", "48", "--api-port", "0",
            "--data-port", "0", "--pub", "tcp://127.0.0.1:0", "--rep", "tcp://127.0.0.1:0")
    res = stemlive(*args)
    assert res.returncode == 0, res.stderr
    assert "scan ready" in res.stdout
    assert "complete: 6/6 blocks" in res.stdout and "thickness error median" in res.stdout
    again = stemlive(*args)
    assert again.returncode == 0 and len(list(tmp_path.iterdir())) == 1  # cached, not rebuilt


def test_help_builds_without_torch():
    code = ("import sys; from stemlive.live.cli import build_parser; build_parser(); "
            "bad = [m for m in ('torch', 'abtem') if m in sys.modules]; assert not bad, bad")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_export_engines_refuses_without_a_gpu():
    from stemlive.models.backends import tensorrt as trt_backend

    if trt_backend.cuda_device() is not None:
        pytest.skip("a CUDA device is present")
    res = stemlive("export", "engines")
    assert res.returncode == 1 and "no CUDA device" in res.stderr and "tensorrt" not in res.stdout


@pytest.mark.parametrize("nice", ["-1", "20", "high"])
def test_live_refuses_a_priority_outside_0_to_19(nice):
    res = stemlive("live", "--detector", "dectris", "--api-port", "1", "--data-port", "2", "--scan-shape", "4", "4",
                   "--out", "x.h5", "--nice", nice)
    assert res.returncode == 2 and "--nice" in res.stderr, res.stderr
