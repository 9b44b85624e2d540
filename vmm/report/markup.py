"""One self-contained HTML page (no vmm imports: a leaf): a title, blocks of markup (figures as inline SVG) and
text sections in <pre> (escaped). No script, no stylesheet or image from elsewhere: it opens
offline, as a CI artifact, in any browser."""

from __future__ import annotations

import html
from typing import Iterable

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1100px; }
h1 { font-size: 1.3em; } h2 { font-size: 1.05em; margin-top: 1.4em; border-bottom: 1px solid #ccc; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.8em; white-space: pre-wrap; }
figure.plot { margin: 0; } figure.plot svg { max-width: 100%; height: auto; }
table { border-collapse: collapse; font-size: 0.85em; } td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: left; }
.failed { color: #b00; } .passed { color: #070; }
"""


def pre(text: str) -> str:
    """Text as an escaped <pre> block."""
    return f"<pre>{html.escape(text)}</pre>"


def table(rows: Iterable[tuple[str, str]]) -> str:
    """(key, value) rows as an escaped two-column table."""
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def page(title: str, blocks: Iterable[tuple[str, str]], subtitle: str = "") -> str:
    """The page: ``blocks`` are (heading, markup) in order; headings are escaped, the
    markup is not (build it with pre(), table() or plot.figure_block())."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    if subtitle:
        parts.append(f"<p>{html.escape(subtitle)}</p>")
    for heading, markup in blocks:
        h2 = f"<h2>{html.escape(heading)}</h2>" if heading else ""
        parts.append(f"<section>{h2}{markup}</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)

