"""Plots of recorded monitor series (vmm/report/plot.py): what can be checked without
eyes. The files are valid PNG/SVG of the size the figure promises; the Figure holds one
line per CPU per metric row (or one heat map per row past 16 CPUs) and one shaded window
per stall, exit and freeze in every row."""

from __future__ import annotations

import json
import struct
import sys
import xml.etree.ElementTree as ET

import pytest

from report_series import error_exit_states, series
from vmm.errors import VmmError
from vmm.report import load_series
from vmm.report.plot import HOW_TO_GET_PLOTS, PlotUnavailable, figure_size, render

mpl = pytest.importorskip("matplotlib", reason="matplotlib not installed: pip install 'vmm[plot]'")

ROWS = 4  # nr_running, scx.nr_running, local DSQ depth, rq clock advance


def png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def gids(fig, prefix: str) -> list:
    """Artists of every row whose gid starts with prefix, per row."""
    out = []
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        found = [a for a in ax.get_children() if (a.get_gid() or "").startswith(prefix)]
        out.append(found)
    return out


def recorded(tmp_path, name: str, data: dict):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_a_stall_on_two_cpus(tmp_path):
    src = recorded(tmp_path, "stall.json", series(cpus=2, stalls=((1, 2.0, 4.5),)))
    fig = render(src, tmp_path / "stall.png")
    assert png_size(tmp_path / "stall.png") == figure_size(ROWS) == (1000, 860)
    lines = gids(fig, "cpu ")
    assert [len(r) for r in lines] == [2] * ROWS  # one line per CPU in each metric row
    assert [len(r) for r in gids(fig, "stall")] == [1] * ROWS  # one shaded window per row
    (st,) = fig.vmm_series.stalls
    assert st.cpu == 1 and 1.8 <= st.t <= 2.1 and 4.4 <= st.end <= 4.6
    assert not any(gids(fig, "exit"))
    # the rq clock row: CPU 1's advance is 0 inside the stall, ~100 ms outside it
    clock_row = fig.axes[ROWS - 1]
    cpu1 = next(a for a in clock_row.get_children() if a.get_gid() == "cpu 1")
    ys = dict(zip(cpu1.get_xdata(), cpu1.get_ydata()))
    assert ys[3.0] == 0 and 95 < ys[1.0] < 110


def test_an_error_exit_as_svg(tmp_path):
    data = series(cpus=2, stalls=((0, 1.0, 4.0),))
    src = recorded(tmp_path, "exit.json", data)
    fig = render(src, tmp_path / "exit.svg", scx_states=error_exit_states(t=5.0))
    root = ET.parse(tmp_path / "exit.svg").getroot()  # parses as XML
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    w, h = figure_size(ROWS)
    assert (root.get("width"), root.get("height")) == (f"{w * 0.72:g}pt", f"{h * 0.72:g}pt")
    assert [len(r) for r in gids(fig, "exit")] == [2] * ROWS  # the exit line and the span after it
    ids = [e.get("id") for e in root.iter() if e.get("id")]
    assert ids.count("exit") == ROWS and ids.count("stall") == ROWS
    text = (tmp_path / "exit.svg").read_text()
    assert "scheduler exit: SCX_EXIT_ERROR_STALL (runnable task stall)" in text  # SVG <text>
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert any("scheduler exit: SCX_EXIT_ERROR_STALL (runnable task stall)" in s for s in labels)
    assert any("cpu 0 stalled" in s for s in labels)


def test_sixty_four_cpus_are_a_heat_map(tmp_path):
    data = series(cpus=64, stalls=((5, 1.0, 3.5), (40, 2.0, 4.0)))
    fig = render(data, tmp_path / "64.png", scx_states=error_exit_states())
    assert png_size(tmp_path / "64.png") == figure_size(ROWS)
    assert not any(gids(fig, "cpu "))
    assert [len(r) for r in gids(fig, "heatmap")] == [1] * ROWS
    mesh = gids(fig, "heatmap")[0][0]
    assert mesh.get_array().shape == (64, 60)  # CPU by sample
    stalls = gids(fig, "stall")
    assert [len(r) for r in stalls] == [2] * ROWS
    # each stall outlines its own CPU's row
    assert sorted(p.get_y() + 0.5 for p in stalls[0]) == [5, 40]


def test_freezes_when_the_series_records_them(tmp_path):
    data = series(cpus=2, stalls=())
    data["freezes"] = [{"start": 0.8, "end": 1.2}, [3.0, 3.0]]
    fig = render(data, tmp_path / "f.png")
    assert [len(r) for r in gids(fig, "freeze")] == [3] * ROWS  # two spans, one instant's line
    assert not any(gids(fig, "stall"))


def test_unknown_columns_are_kept_and_rows_follow_the_known_ones(tmp_path):
    data = series(cpus=2, extra_column=True)
    s = load_series(data)
    assert "scx.events.SCX_EV_SELECT_CPU_FALLBACK" in s.columns
    assert s.column("scx.events.SCX_EV_SELECT_CPU_FALLBACK", 1)[25] == 2
    fig = render(data, tmp_path / "x.png")
    assert len([a for a in fig.axes if a.get_label() != "<colorbar>"]) == ROWS
    # a kernel without a local DSQ count (our test guest): three rows
    for smp in data["samples"]:
        for row in smp["cpus"]:
            del row["scx.local_dsq.nr"]
    data["fields"].remove("scx.local_dsq.nr")
    render(data, tmp_path / "three.png")
    assert png_size(tmp_path / "three.png") == figure_size(3)


def test_html_holds_the_figure_inline(tmp_path):
    render(series(cpus=2), tmp_path / "m.html", scx_states=error_exit_states())
    page = (tmp_path / "m.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and 'id="stall"' in page
    assert "<script" not in page and "src=\"http" not in page and "href=\"http" not in page


def test_bad_input_is_named(tmp_path):
    with pytest.raises(VmmError, match="say .png, .svg or .html"):
        render(series(), tmp_path / "x.jpg")
    assert not (tmp_path / "x.jpg").exists()
    bad = tmp_path / "bad.json"
    bad.write_text('{"cpus": [0]}')
    with pytest.raises(VmmError, match="bad.json: not a monitor series"):
        render(bad, tmp_path / "x.png")
    bad.write_text("not json")
    with pytest.raises(VmmError, match="not JSON"):
        load_series(bad)
    with pytest.raises(VmmError, match="no samples"):
        render(dict(series(), samples=[]), tmp_path / "x.png")


def test_without_matplotlib_the_message_says_how(monkeypatch, tmp_path):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(PlotUnavailable, match=r"pip install 'vmm\[plot\]'"):
        render(series(), tmp_path / "x.png")
    assert "text evidence" in HOW_TO_GET_PLOTS
    assert not (tmp_path / "x.png").exists()
