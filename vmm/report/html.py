"""``vmm report``'s page: a test's saved evidence (vmm.report.evidence) as one
self-contained HTML page (vmm.report.markup), the monitors' figures inline (vmm.report.plot)."""

from __future__ import annotations

from .markup import page, pre, table


MAX_TESTS = 200  # tests on one page


def evidence_blocks(ev, directory=None) -> list[tuple[str, str]]:
    """An Evidence (vmm.report.evidence) as page blocks: the monitors' figures (inline
    SVG, drawn again from the saved series; else the saved PNG; else how to get plots),
    then every text section, then the JUnit properties."""
    import base64
    import os

    from .plot import PlotUnavailable, figure, figure_block

    blocks = []
    for i, mon in enumerate(ev.monitors):
        heading = f"{ev.test}: monitor {i}" if ev.test else f"monitor {i}"
        try:
            blocks.append((heading, figure_block(figure(mon, ev.scx_states))))
        except PlotUnavailable as e:
            png = os.path.join(str(directory), f"plot-{i}.png") if directory is not None else None
            if png and os.path.isfile(png):
                with open(png, "rb") as f:
                    uri = "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")
                blocks.append((heading, f'<figure class="plot"><img alt="monitor {i}" src="{uri}"></figure>'))
            else:
                blocks.append((heading, pre(str(e))))
        except Exception as e:  # a series that cannot be drawn: say so, show the rest
            blocks.append((heading, pre(f"not drawn: {type(e).__name__}: {e}")))
    for name, text in ev.sections:
        blocks.append((name, pre(text)))
    if ev.properties:
        blocks.append(("JUnit XML properties", table(ev.properties)))
    if ev.notes:
        blocks.append(("notes", pre("\n".join(ev.notes))))
    return blocks


def evidence_page(items) -> str:
    """One page for [(directory, Evidence)]: a summary table, then each test's blocks."""
    items = list(items)[:MAX_TESTS]
    summary = table((ev.test or str(d), ev.outcome) for d, ev in items)
    blocks = [("tests", summary)] if len(items) > 1 else []
    for d, ev in items:
        if len(items) > 1:
            blocks.append((f"{ev.test} ({ev.outcome})", ""))
        blocks.extend(evidence_blocks(ev, d))
    title = "vmm report: " + (items[0][1].test or str(items[0][0]) if len(items) == 1 else f"{len(items)} tests")
    sub = (f"outcome: {items[0][1].outcome}" if len(items) == 1 else "") if items else "no evidence"
    return page(title, blocks, sub)
