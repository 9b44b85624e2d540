"""What a vmm test leaves behind when it fails (or always, on request): the evidence a
developer reads first, collected from a Machine while it still runs.

``collect(machine)`` -> Evidence: named text sections (the machine's configuration, why
the VM ended, the console tail, requests served, sched_ext's state, stalls the monitors
saw, the kernel's sched_ext dump when the console holds one, the vmcore's path), short
``properties`` for JUnit XML, and the monitors' series. ``Evidence.save(dir)`` writes
evidence.json, each monitor's JSON and its plot (when matplotlib is there);
``load(dir)`` reads it back for ``vmm report DIR``.

Every section is bounded (lines, characters): the console and the dump are the guest's
output, and a report must stay readable whatever the guest printed. Nothing here raises
for the test: what cannot be read is said in its section.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

CONSOLE_LINES = 50      # console tail in the report
PROPERTY_LINES = 10     # console lines in the JUnit property
DUMP_LINES = 200        # lines of the kernel's sched_ext dump kept
LINE_CHARS = 400        # any one line kept, at most
MAX_MONITORS = 4        # monitors' series saved per test
EVIDENCE_FILE = "evidence.json"

# Where the kernel's sched_ext debug dump starts on the console: scx_dump_state's first
# line (7.3's kernel/sched/ext/ext.c: "<comm>[<pid>] triggered exit kind <n>[ on CPU
# <n>]:" for an exit, "Debug dump triggered by <reason>" for sysrq D) or the "DEBUG DUMP"
# banner the schedulers' user space (UEI_REPORT) prints around it.
DUMP_START = re.compile(r"triggered exit kind \d+|Debug dump triggered by|DEBUG DUMP")


def _clip(text: str, lines: Optional[int] = None) -> str:
    out = [ln if len(ln) <= LINE_CHARS else ln[:LINE_CHARS] + " [...]" for ln in text.splitlines()]
    if lines is not None and len(out) > lines:
        out = out[-lines:]
    return "\n".join(out)


def _try(what, default: str = "") -> str:
    try:
        value = what()
    except Exception as e:  # a report never hides the test's own failure
        return f"not read: {type(e).__name__}: {e}"
    return default if value is None else str(value)


def vmm_version() -> str:
    """The installed vmm's version (its package metadata)."""
    try:
        from importlib.metadata import version
        return version("vmm")
    except Exception:  # run from a source tree that was never installed
        return "unknown (not installed)"


@dataclass
class Evidence:
    """A test's evidence: ``sections`` [(name, text)], ``properties`` [(name, value)]
    (short, for JUnit XML), ``monitors`` (each a monitor's as_dict()), ``scx_states``
    (dicts), ``plots`` (file names written by save)."""

    test: str = ""
    outcome: str = ""
    sections: list[tuple[str, str]] = field(default_factory=list)
    properties: list[tuple[str, str]] = field(default_factory=list)
    monitors: list[dict] = field(default_factory=list)
    scx_states: list[dict] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def section(self, name: str) -> Optional[str]:
        return next((text for n, text in self.sections if n == name), None)

    def text(self) -> str:
        """Every section as plain text (the terminal's)."""
        out = []
        for name, body in self.sections:
            out.append(f"--- {name} ---")
            out.append(body)
        out.extend(self.notes)
        return "\n".join(out)

    def as_dict(self) -> dict:
        return {"test": self.test, "outcome": self.outcome,
                "sections": [list(s) for s in self.sections],
                "properties": [list(p) for p in self.properties],
                "scx_states": self.scx_states, "plots": self.plots, "notes": self.notes,
                "monitors": [f"monitor-{i}.json" for i in range(len(self.monitors))]}

    def save(self, directory: Any, plot: bool = True) -> Path:
        """Write evidence.json, monitor-N.json and (with matplotlib, ``plot``) plot-N.png
        into ``directory`` (created; owner-only files: they hold guest memory and output).
        Returns the directory."""
        from vmm.hostio import atomic_write

        from .plot import PlotUnavailable, render

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.plots = []
        for i, mon in enumerate(self.monitors):
            atomic_write(d / f"monitor-{i}.json", json.dumps(mon) + "\n", private=True)
            if not plot:
                continue
            try:
                render(mon, d / f"plot-{i}.png", scx_states=self.scx_states)
                self.plots.append(f"plot-{i}.png")
            except PlotUnavailable as e:
                if str(e) not in self.notes:
                    self.notes.append(str(e))
            except Exception as e:  # a plot never hides the test's own failure
                self.notes.append(f"plot {i} not drawn: {type(e).__name__}: {e}")
        atomic_write(d / EVIDENCE_FILE, json.dumps(self.as_dict(), indent=1) + "\n", private=True)
        return d


def load(directory: Any) -> Evidence:
    """The Evidence saved in ``directory`` (its monitors read back as dicts)."""
    from vmm.errors import VmmError

    d = Path(directory)
    path = d / EVIDENCE_FILE
    if not path.is_file():
        raise VmmError(f"{d}: no {EVIDENCE_FILE} here (what the vmm pytest plugin saves per test "
                       f"with --vmm-evidence-dir)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise VmmError(f"{path}: not JSON ({e})") from None
    ev = Evidence(test=str(data.get("test", "")), outcome=str(data.get("outcome", "")),
                  sections=[(str(a), str(b)) for a, b in data.get("sections", [])],
                  properties=[(str(a), str(b)) for a, b in data.get("properties", [])],
                  scx_states=list(data.get("scx_states", [])), plots=list(data.get("plots", [])),
                  notes=list(data.get("notes", [])))
    for name in data.get("monitors", [])[:MAX_MONITORS]:
        p = d / os.path.basename(str(name))
        if p.is_file():
            ev.monitors.append(json.loads(p.read_text(encoding="utf-8")))
    return ev


# --- collecting from a machine ----------------------------------------------------------
def machine_configuration(m: Any) -> str:
    """Kernel, build id, CPUs and topology, memory, cmdline, vmm version."""
    kernel = getattr(m, "kernel", None)
    lines = [f"kernel: {kernel}"]
    artifacts = getattr(m, "artifacts", None)
    if artifacts is not None:
        lines.append(f"store kernel: {getattr(artifacts, 'name', artifacts)}")
    lines.append(f"build id: {_try(lambda: _build_id(m), 'none')}")
    topo = getattr(m, "topology", None)
    lines.append(f"cpus: {getattr(m, 'cpus', '?')}" + (f", topology {topo}" if topo is not None else ""))
    mem = getattr(m, "memory_size", None)
    if isinstance(mem, int):
        lines.append(f"memory: {mem >> 20} MiB")
    lines.append(f"cmdline: {getattr(m, 'cmdline', '') or getattr(m, 'requested_cmdline', '')}")
    lines.append(f"vmm: {vmm_version()}")
    return "\n".join(lines)


def _build_id(m: Any) -> Optional[str]:
    loaded = m.__dict__.get("_introspection")  # the session's loaded Kernel, when it loaded one
    if loaded is not None and getattr(loaded, "build_id", None):
        return loaded.build_id
    from vmm.kernel.locate import build_id

    for path in (getattr(m, "_vmlinux_path", None), getattr(m, "kernel", None)):
        if path and os.path.isfile(str(path)):
            bid = build_id(str(path))
            if bid:
                return bid
    return None


def sched_ext_dump(console: str) -> Optional[str]:
    """The kernel's sched_ext dump in the console text, from its first line on (at most
    DUMP_LINES lines), or None."""
    match = None
    for match in DUMP_START.finditer(console):
        pass  # the last dump: the one of this failure
    if match is None:
        return None
    start = console.rfind("\n", 0, match.start()) + 1
    lines = console[start:].splitlines()[:DUMP_LINES]
    return _clip("\n".join(lines))


def _scx_state(m: Any, ev: Evidence) -> str:
    if not getattr(m, "is_linux", False):
        return "not read: not a Linux guest (sched_ext lives in Linux)"
    view = m.scx
    state = None
    if getattr(m, "running", False):
        state = view.state()
    state = state if state is not None and state.exited else (getattr(view, "last_exit", None) or state)
    if state is None:
        return "not read: the VM has ended"
    ev.scx_states.append(dict(state.as_dict()))
    return state.describe()


def _stalls(m: Any, ev: Evidence) -> str:
    lines = []
    for i, mon in enumerate(list(m.__dict__.get("_monitors", ()))[-MAX_MONITORS:]):
        try:
            ev.monitors.append(mon.as_dict())
            stalls = mon.stalls()
        except Exception as e:
            lines.append(f"monitor {i}: stalls not found: {e}")
            continue
        head = f"monitor {i}: {len(mon.samples)} samples every {mon.interval:g} s of CPUs " \
               f"{','.join(map(str, mon.cpus))}"
        lines.append(head + (": no stall" if not stalls else ""))
        lines.extend(f"  {st.describe()}" for st in stalls[:20])
    for w in list(m.__dict__.get("_stall_watches", ()))[-MAX_MONITORS:]:
        for report in list(getattr(w, "reports", ()))[:4]:
            lines.append(_clip(_try(report.describe)))
    return "\n".join(lines) if lines else "no monitor ran (m.monitor() / m.watch_for_stall())"


def collect(m: Any, test: str = "", outcome: str = "") -> Evidence:
    """Everything a failed test's reader wants from machine ``m`` (a vmm.Machine), each
    piece read on its own: one that fails says why in its section."""
    ev = Evidence(test=test, outcome=outcome)
    config = _try(lambda: machine_configuration(m))
    ev.sections.append(("vmm machine", config))
    exit_ = getattr(m, "exit", None)
    ev.sections.append(("vmm exit", _try(lambda: f"{'running' if m.running else 'ended'}; exit: {exit_}\n"
                                         + m.describe_state())))
    console = _try(lambda: m.console_text())
    ev.sections.append(("vmm console (tail)", _clip(console, CONSOLE_LINES)))
    ev.sections.append(("vmm requests", _try(lambda: _requests(m))))
    scx = _try(lambda: _scx_state(m, ev))
    ev.sections.append(("vmm sched_ext", scx))
    ev.sections.append(("vmm stalls", _try(lambda: _stalls(m, ev))))
    dump = sched_ext_dump(console)
    if dump:
        ev.sections.append(("vmm sched_ext dump", dump))
    core = getattr(m, "core_path", None)  # the vmcore a panic wrote (Machine.dump_on_panic)
    cores = ([str(core)] if core else []) + list(getattr(m, "vmcores_written", []))  # m.dump_core's
    if cores:
        ev.sections.append(("vmm vmcore", "\n".join(cores) + f"\n(open one: crash vmlinux "
                            f"{cores[-1]}, or drgn -c {cores[-1]})"))
        core = cores[-1]
    props = [("vmm.kernel", str(getattr(m, "kernel", ""))),
             ("vmm.build_id", _try(lambda: _build_id(m), "none")),
             ("vmm.cmdline", str(getattr(m, "cmdline", ""))),
             ("vmm.exit", str(exit_) if exit_ is not None else "running"),
             ("vmm.sched_ext", scx.splitlines()[0] if scx else ""),
             ("vmm.stalls", str(sum(1 for ln in (ev.section("vmm stalls") or "").splitlines()
                                    if ln.startswith("  cpu ")))),
             ("vmm.console_tail", _clip(console, PROPERTY_LINES))]
    if core:
        props.append(("vmm.vmcore", str(core)))
    ev.properties = props
    return ev


def _requests(m: Any) -> str:
    channel = getattr(m, "requests", None)
    if channel is None:
        return "no request channel"
    names = _try(channel.names)
    return (f"handlers: {names or 'none'}; served {getattr(channel, 'served', 0)}, "
            f"dropped {getattr(channel, 'dropped', 0)}")
