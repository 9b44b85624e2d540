"""``vmm report``: a test's saved evidence (the pytest plugin's --vmm-evidence-dir) as one
self-contained HTML page, or a monitor's JSON (vmm run --monitor-json) as a plot."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from .errors import VmmError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report", help="turn a test's saved evidence into one HTML page, or plot a monitor's JSON",
        description="DIR: a test's evidence directory (evidence.json, saved by the pytest plugin) "
                    "or a directory of them -> one HTML page (default DIR/report.html). "
                    "FILE.json: a monitor's series (vmm run --monitor-json) -> a plot "
                    "(-o .png, .svg or .html; default FILE.html). Plots need matplotlib: "
                    "pip install 'vmm[plot]'.")
    p.add_argument("source", help="evidence directory, or a monitor's JSON file")
    p.add_argument("-o", "--output", default=None, help="where to write the page or plot")


def evidence_dirs(root: Path) -> list[Path]:
    """``root`` itself when it holds evidence, else its subdirectories that do (sorted)."""
    from .report.evidence import EVIDENCE_FILE

    if (root / EVIDENCE_FILE).is_file():
        return [root]
    return sorted(p.parent for p in root.glob(f"*/{EVIDENCE_FILE}"))


def run(args: argparse.Namespace) -> int:
    """Write the page (or plot) and print its path; 0, or VmmError naming what is wrong."""
    from .hostio import atomic_write

    source = Path(args.source)
    if source.is_file():
        from .report.plot import render

        out = args.output or str(source.with_suffix(".html"))
        render(source, out)
        print(out)
        return 0
    if not source.is_dir():
        raise VmmError(f"{source}: no such file or directory (give an evidence directory or a "
                       f"monitor's JSON)")
    dirs = evidence_dirs(source)
    if not dirs:
        raise VmmError(f"{source}: no evidence.json in it or in its subdirectories (the pytest "
                       f"plugin saves one per test under --vmm-evidence-dir)")
    from .report.evidence import load
    from .report.html import evidence_page

    text = evidence_page((d, load(d)) for d in dirs)
    out = args.output or os.path.join(source, "report.html")
    atomic_write(out, text, private=True)  # guest output and memory: owner-only, as the evidence
    print(out)
    return 0
