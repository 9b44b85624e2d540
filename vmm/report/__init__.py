"""Reports people look at when a scheduler test fails: plots of the monitor's time series
(vmm.report.plot, matplotlib as the optional ``plot`` extra), the evidence a failed test
leaves (vmm.report.evidence: console tail, exit, sched_ext state, stalls, the kernel's
sched_ext dump, vmcore path, the machine's configuration) and one self-contained HTML page
of it (vmm.report.html, ``vmm report DIR``).

A tool of the top floor: it reads the runtime's and kernel's data (a Monitor, its JSON, an
ScxState, a StallReport) and never imports the session or the CLI.
"""

from __future__ import annotations

from .series import Event, Series, load_series
from .plot import PlotUnavailable, render

__all__ = ["Event", "Series", "load_series", "PlotUnavailable", "render"]
