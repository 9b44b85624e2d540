"""A test's saved evidence and `vmm report`: the evidence directory round-trips, the page
is self-contained and escapes what the guest printed, `vmm report FILE.json` plots, and
Debian's Chromium (headless) renders the page with the figure on it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from report_series import error_exit_states, series
from vmm.cli import main
from vmm.report.evidence import Evidence, load, sched_ext_dump

CONSOLE = "boot...\n<script>alert('guest')</script>\nkworker[42] triggered exit kind 1026:\n  runnable task stall\n"


def saved(tmp_path, name="t1", plot=True) -> Evidence:
    ev = Evidence(test=f"tests/test_x.py::{name}", outcome="failed",
                  sections=[("vmm machine", "kernel: guest.elf\ncpus: 2"),
                            ("vmm console (tail)", CONSOLE),
                            ("vmm sched_ext", "sched_ext disabling, exit SCX_EXIT_ERROR_STALL"),
                            ("vmm sched_ext dump", sched_ext_dump(CONSOLE))],
                  properties=[("vmm.kernel", "guest.elf"), ("vmm.stalls", "1")],
                  monitors=[series(cpus=2)], scx_states=error_exit_states())
    ev.save(tmp_path / name, plot=plot)
    return ev


def test_evidence_round_trips(tmp_path):
    ev = saved(tmp_path)
    d = tmp_path / "t1"
    assert sorted(p.name for p in d.iterdir()) == ["evidence.json", "monitor-0.json", "plot-0.png"]
    assert all(p.stat().st_mode & 0o077 == 0 for p in d.iterdir())  # owner-only
    back = load(d)
    assert back.sections == ev.sections and back.properties == ev.properties
    assert back.monitors == [json.loads(json.dumps(series(cpus=2)))] and back.plots == ["plot-0.png"]
    assert back.section("vmm sched_ext dump").startswith("kworker[42] triggered exit kind 1026:")


def test_vmm_report_dir_is_one_self_contained_page(tmp_path, capsys):
    saved(tmp_path, "t1")
    saved(tmp_path, "t2")
    assert main(["report", str(tmp_path / "t1")]) == 0
    out = capsys.readouterr().out.strip()
    page = open(out).read()
    assert out == str(tmp_path / "t1" / "report.html")
    assert "&lt;script&gt;alert(&#x27;guest&#x27;)&lt;/script&gt;" in page and "<script" not in page
    assert page.count("<svg") == 1 and "SCX_EXIT_ERROR_STALL" in page and "vmm.stalls" in page
    assert not re.findall(r'(?:src|href|url)\s*[=(]\s*["\']?(?:https?:)?//', page)  # nothing fetched
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "all.html")]) == 0
    both = (tmp_path / "all.html").read_text()
    assert both.count("<svg") == 2 and "2 tests" in both


def test_vmm_report_plots_a_monitor_json(tmp_path, capsys):
    src = tmp_path / "rq.json"
    src.write_text(json.dumps(series(cpus=2)))
    assert main(["report", str(src), "-o", str(tmp_path / "rq.png")]) == 0
    assert (tmp_path / "rq.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["report", str(src)]) == 0 and (tmp_path / "rq.html").exists()
    assert main(["report", str(tmp_path / "nowhere")]) == 1
    assert "no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 1
    assert "no evidence.json" in capsys.readouterr().err


def test_without_matplotlib_the_evidence_still_saves(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    ev = saved(tmp_path)
    assert ev.plots == [] and any("pip install 'vmm[plot]'" in n for n in ev.notes)
    assert main(["report", str(tmp_path / "t1")]) == 0
    page = (tmp_path / "t1" / "report.html").read_text()
    assert "pip install &#x27;vmm[plot]&#x27;" in page and "SCX_EXIT_ERROR_STALL" in page


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (Debian package chromium; make deps installs it)")
    return path


def headless(*args: str) -> subprocess.CompletedProcess:
    # Not under our sanitizer run's preloads (make test-asan): the browser is not ours,
    # and with libasan preloaded it hangs.
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                           "--no-first-run", "--hide-scrollbars", "--enable-logging=stderr",
                           "--v=0", *args], capture_output=True, text=True, timeout=120, env=env)


def test_chromium_renders_the_page_with_the_figure(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed: pip install 'vmm[plot]'")
    from matplotlib.image import imread

    saved(tmp_path)
    assert main(["report", str(tmp_path / "t1")]) == 0
    url = (tmp_path / "t1" / "report.html").as_uri()
    dom = headless("--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<svg" in dom.stdout and 'id="stall"' in dom.stdout and 'id="exit"' in dom.stdout
    # no page errors: no script ran, nothing failed to load
    bad = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln
           or "net::ERR" in ln]
    assert not bad, bad
    shot = tmp_path / "shot.png"
    r = headless("--window-size=1100,1100", f"--screenshot={shot}", url)
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    px = imread(str(shot))[..., :3]
    assert px.shape[:2] == (1100, 1100)
    # the figure is on screen: the stall's pink shading and the CPUs' blue/orange lines
    pink = ((px[..., 0] > 0.9) & (px[..., 1] > 0.75) & (px[..., 1] < 0.9) & (px[..., 2] > 0.75)
            & (px[..., 2] < 0.9)).sum()
    blue = ((px[..., 2] > 0.6) & (px[..., 0] < 0.3)).sum()
    orange = ((px[..., 0] > 0.9) & (px[..., 1] > 0.4) & (px[..., 1] < 0.6) & (px[..., 2] < 0.2)).sum()
    assert pink > 2000 and blue > 200 and orange > 200, (pink, blue, orange)
