"""Plots of the monitor's time series (matplotlib, the ``plot`` extra, Agg backend).

One row per metric: nr_running, scx.nr_running, the local DSQ's depth (scx.local_dsq.nr)
and how far each CPU's rq clock moved per sample (ms; 0 under runnable tasks is a stall);
rows the series lacks are left out. Up to 16 CPUs one line per CPU; past that one heat map
per row (CPU by time). Stall windows are shaded red and labelled with their CPU, the
scheduler's exit drawn as a line and the span after it shaded, freezes shaded grey.

Every drawn artist carries a gid ("cpu N", "heatmap", "stall", "exit", "freeze"), so a
test (or anyone) counts series and windows in the Figure object; the SVG keeps the gids
as element ids.

matplotlib is the field's well-kept plotting library and renders PNG and SVG headless with
no display; it stays optional (``pip install 'vmm[plot]'``) so the core install is light.
"""

from __future__ import annotations

import base64
import io
import os
from typing import Any, Iterable, Optional

from vmm.errors import VmmError

from .series import Series, load_series

#: (column, row title, transform): the metrics plotted, top to bottom.
ROWS = (("nr_running", "nr_running", None),
        ("scx.nr_running", "scx.nr_running", None),
        ("scx.local_dsq.nr", "local DSQ depth", None),
        ("clock", "rq clock advance\nper sample (ms)", "advance"))
HEATMAP_PAST = 16   # more CPUs than this: a heat map per row instead of a line per CPU
WIDTH_IN = 10.0     # figure width (inches); at DPI dots per inch: 1000 px
ROW_IN = 1.9        # height per row
EXTRA_IN = 1.0      # title and axis labels
DPI = 100
FORMATS = (".png", ".svg", ".html")

STALL_COLOR, EXIT_COLOR, FREEZE_COLOR = "#d62728", "#7b2cbf", "#7f7f7f"


class PlotUnavailable(VmmError):
    """matplotlib is not installed: plots need the ``plot`` extra."""


HOW_TO_GET_PLOTS = ("plots need matplotlib: pip install 'vmm[plot]' (or pip install matplotlib); "
                    "the text evidence is complete without it")


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable(HOW_TO_GET_PLOTS) from None
    return matplotlib, Figure, FigureCanvasAgg


def available() -> bool:
    """Whether plots can be drawn here (matplotlib importable)."""
    try:
        _matplotlib()
    except PlotUnavailable:
        return False
    return True


def figure_size(rows: int) -> tuple[int, int]:
    """(width, height) in pixels of a PNG of ``rows`` metric rows."""
    return round(WIDTH_IN * DPI), round((EXTRA_IN + ROW_IN * rows) * DPI)


def plotted_rows(series: Series) -> list[tuple[str, str, Optional[str]]]:
    """The ROWS this series has a column for (all four when it has them)."""
    rows = [r for r in ROWS if r[0] in series.columns]
    if not rows:  # an unusual monitor: its own columns, at most four
        rows = [(name, name, None) for name in list(series.columns)[:4]]
    return rows


def _values(series: Series, column: str, transform: Optional[str]) -> list[list[Optional[float]]]:
    return series.advance(column) if transform == "advance" else series.columns[column]


def figure(source: Any, scx_states: Iterable[Any] = (), title: Optional[str] = None,
           window_s: float = 1.0):
    """A matplotlib Figure of ``source`` (a Monitor, its dict or JSON path, or a Series);
    ``scx_states``: sched_ext states (ScxState or dicts with ``t``) whose exits are marked.
    PlotUnavailable without matplotlib."""
    _, Figure, FigureCanvasAgg = _matplotlib()
    import numpy as np  # matplotlib's own dependency
    from matplotlib.ticker import MaxNLocator

    series = load_series(source, window_s)
    series.add_scx_states(scx_states)
    rows = plotted_rows(series)
    if not rows or not series.times:
        raise VmmError("nothing to plot: the series has no samples"
                       if not series.times else "nothing to plot: the series has no columns")
    w, h = figure_size(len(rows))
    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 1, sharex=True, squeeze=False)[:, 0]
    t = np.asarray(series.times, dtype=float)
    t_end = float(t[-1]) if len(t) else 0.0
    heat = len(series.cpus) > HEATMAP_PAST
    for ax, (column, label, transform) in zip(axes, rows):
        values = _values(series, column, transform)
        data = np.array([[np.nan if v is None else v for v in col] for col in values], dtype=float)
        if heat:
            edges = np.append(t, t_end + (series.interval or (t[-1] - t[-2] if len(t) > 1 else 1.0)))
            mesh = ax.pcolormesh(edges, np.arange(len(series.cpus) + 1) - 0.5,
                                 np.ma.masked_invalid(data), shading="flat", cmap="viridis")
            mesh.set_gid("heatmap")
            fig.colorbar(mesh, ax=ax, pad=0.01, fraction=0.03)
            ax.set_ylim(-0.5, len(series.cpus) - 0.5)
            ax.set_ylabel(f"{label}\n(CPU)", fontsize=8)
        else:
            for i, cpu in enumerate(series.cpus):
                (line,) = ax.plot(t, data[i], drawstyle="steps-post", linewidth=1.2, label=f"cpu {cpu}")
                line.set_gid(f"cpu {cpu}")
            ax.set_ylabel(label, fontsize=8)
            ax.grid(True, alpha=0.3)
            if transform is None:  # counts: integer ticks
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            finite = data[np.isfinite(data)]
            lo = min(0.0, float(finite.min())) if finite.size else 0.0
            hi = max(1.0, float(finite.max())) if finite.size else 1.0
            pad = (hi - lo) * 0.08  # an all-zero row still shows 0 and 1
            ax.set_ylim(lo - pad, hi + pad)
        ax.tick_params(labelsize=8)
        _shade(ax, series, t_end, labels=ax is axes[0], heat=heat)
    if not heat and len(series.cpus) > 0:
        axes[0].legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False,
                       ncol=min(8, len(series.cpus)))  # above the plot: never over the data
    axes[-1].set_xlabel("seconds since the monitor started", fontsize=8)
    ntext = f"{len(series.times)} samples" + (f" every {series.interval:g} s" if series.interval else "")
    stalls = f"{len(series.stalls)} stall(s)" if series.stalls else "no stall"
    fig.suptitle(title or f"vmm monitor: {ntext}, {len(series.cpus)} CPU(s), {stalls}", fontsize=10)
    legend_rows = 0 if heat else -(-len(series.cpus) // 8)
    top_in = 0.45 + 0.15 * legend_rows  # the title, and the legend above the first row
    fig.subplots_adjust(left=0.1, right=0.97 if not heat else 0.95, top=1 - top_in / (h / DPI),
                        bottom=0.45 / (h / DPI), hspace=0.12)
    fig.vmm_series = series  # what was drawn, for whoever holds the figure
    return fig


def _label(ax, t: float, t_end: float, y: float, text: str, color: str) -> None:
    """A label at x=t near the top of ``ax``: to the right of t, or ending at t when t
    is in the last 40% of the series (so it stays inside the axes)."""
    right = t_end > 0 and t > 0.6 * t_end
    ax.text(t, y, f"{text} " if right else f" {text}", transform=ax.get_xaxis_transform(), va="top",
            ha="right" if right else "left", fontsize=7, color=color, clip_on=True,
            bbox={"facecolor": "white", "alpha": 0.75, "edgecolor": "none", "pad": 1})


def _shade(ax, series: Series, t_end: float, labels: bool, heat: bool = False) -> None:
    from matplotlib.patches import Rectangle

    for st in series.stalls:
        end = st.end if st.end is not None else st.t
        if heat and st.cpu in series.cpus:  # a heat map: outline that CPU's row in the window
            row = series.cpus.index(st.cpu)
            span = ax.add_patch(Rectangle((st.t, row - 0.5), end - st.t, 1.0, fill=False,
                                          edgecolor=STALL_COLOR, linewidth=1.6))
        else:
            span = ax.axvspan(st.t, end, color=STALL_COLOR, alpha=0.18, linewidth=0)
        span.set_gid("stall")
        if labels:
            _label(ax, st.t, t_end, 0.97, st.label, STALL_COLOR)
    for ev in series.events:
        if ev.kind == "exit":
            line = ax.axvline(ev.t, color=EXIT_COLOR, linewidth=1.5)
            line.set_gid("exit line")
            span = ax.axvspan(ev.t, max(t_end, ev.t), color=EXIT_COLOR, alpha=0.08, linewidth=0)
            span.set_gid("exit")
            if labels:
                _label(ax, ev.t, t_end, 0.80, f"scheduler exit: {ev.label}", EXIT_COLOR)
        elif ev.kind == "freeze":
            end = ev.end if ev.end is not None and ev.end > ev.t else ev.t
            span = ax.axvspan(ev.t, end, color=FREEZE_COLOR, alpha=0.3, hatch="//", linewidth=0)
            span.set_gid("freeze")
            if ev.end is None or ev.end <= ev.t:
                ax.axvline(ev.t, color=FREEZE_COLOR, linestyle=":", linewidth=1).set_gid("freeze line")
            if labels:
                _label(ax, ev.t, t_end, 0.63, "freeze", FREEZE_COLOR)


def figure_bytes(fig, fmt: str) -> bytes:
    """The figure as "png" or "svg" bytes (at its own size: no tight cropping)."""
    import matplotlib

    buf = io.BytesIO()
    # SVG text as <text> (searchable, smaller; any browser has a sans-serif font)
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format=fmt, dpi=DPI,
                    metadata={"Software": None} if fmt == "png" else {"Date": None})
    return buf.getvalue()


def svg_inline(svg: bytes) -> str:
    """An SVG document as markup to put inside HTML (no XML declaration or DOCTYPE)."""
    text = svg.decode("utf-8")
    start = text.find("<svg")
    return text[start:] if start >= 0 else text


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def html_page(fig, title: str = "vmm monitor") -> str:
    """A self-contained HTML page holding the figure as inline SVG (no network, no script)."""
    from .markup import page

    return page(title, [("", figure_block(fig))])


def figure_block(fig) -> str:
    """The figure as an HTML block: inline SVG in a <figure>."""
    return f'<figure class="plot">{svg_inline(figure_bytes(fig, "svg"))}</figure>'


def render(source: Any, path: Any, scx_states: Iterable[Any] = (), title: Optional[str] = None,
           window_s: float = 1.0):
    """Draw ``source`` (see figure) to ``path``: .png, .svg, or .html (a page with the
    figure inline). Returns the Figure. The format is checked before anything is drawn."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FORMATS:
        raise VmmError(f"plot {path!r}: say .png, .svg or .html (the format follows the suffix)")
    fig = figure(source, scx_states, title, window_s)
    if suffix == ".html":
        data = html_page(fig, title or "vmm monitor").encode("utf-8")
    else:
        data = figure_bytes(fig, suffix[1:])
    from vmm.hostio import atomic_write

    atomic_write(path, data, private=True)  # values read from guest memory, as the JSON
    return fig

