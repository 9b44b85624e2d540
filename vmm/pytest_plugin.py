"""pytest plugin (enabled by ``pip install``, entry point ``pytest11: vmm``).

Fixture ``vmm_machine``: a booted :class:`vmm.Machine` built from the
``@pytest.mark.vmm(cpus=2, memory="512M", cmdline=..., kernel=..., wait_for=...)``
marker and the ``--vmm-kernel`` / ``--vmm-cpus`` / ``--vmm-memory`` options. Any other
Machine option goes in the marker too, e.g. ``console_window="1M"`` and
``console_log="console.log"`` (the whole console in a file; memory keeps the window).

Boots are reused: machines with the same options (the boot marker ``wait_for``
included, and for a kernel file its size and modification time) are shared across
tests of a session, unless the test asks ``fresh=True`` or changed the guest: any
write (``apply``/``write``, ``machine.memory.write*``, ``feed_console``) marks it dirty,
and a dirty machine is stopped instead of reused.
Clones instead of boots: with ``clone=True`` in the marker, the first test of those
options boots a template machine (to ``wait_for`` when given: a job that attached a
scheduler and printed a marker makes a scheduler-attached template), snapshots it in
memory (``m.snapshot()``) and stops it; every test then gets its own copy-on-write clone
(``Machine.clone_pool``: its VM and vCPUs made while the previous test ran), stopped when
the test ends, so a test may write the guest freely. A clone's console starts empty (the
marker was the template's). The snapshots and pools are dropped at the session's end.
When a test fails (or always, with ``--vmm-evidence=always``), its evidence is attached
to its report (vmm/report/evidence.py): the machine's configuration, why the VM ended, the
console tail, requests served, sched_ext's state, the monitors' stalls, the kernel's
sched_ext dump and the vmcore's path when there are; as report sections (the terminal's
failure text, pytest-html), JUnit XML properties (``vmm.*``), a line in the terminal
summary, and a directory per test (``--vmm-evidence-dir``) that ``vmm report DIR`` turns
into one HTML page with the monitors' plots.

Parallel matrices: ``pytest -n auto`` (pytest-xdist) gives each worker its own
machines; parametrize over kernels/CPU counts with ``pytest.mark.vmm`` in
``pytest.param(..., marks=...)``. Across hosts: ``pytest -d --tx ssh=host//python=python3``.

Topology gauntlet: ``@pytest.mark.vmm_gauntlet(presets=["llc2", "numa2-smt"], budget_s=300)``
runs the test once per topology preset (vmm.topology.presets(); all of them when
``presets`` is left out), each variant named by its preset (``test_x[numa2-smt]``), its
machine built with that topology. ``budget_s`` bounds the whole gauntlet on this host:
counted from its first variant's start (across xdist workers), each variant's VM gets
what is left as its timeout (and boot-marker wait), and a variant that would start with
nothing left fails saying so. The variants are separate
test items, so ``pytest -n auto`` spreads them over local workers and ``--tx`` over
other hosts' (execnet) with no more from us.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest

_POOL_KEY = pytest.StashKey[dict]()
_MACHINE_KEY = pytest.StashKey[Any]()
_EVIDENCE_KEY = pytest.StashKey[list]()  # [(nodeid, outcome, directory, Evidence)]
_SNAPSHOT_KEY = pytest.StashKey[dict]()  # pool key -> Snapshot of a booted template (clone=True)


def pytest_addoption(parser: pytest.Parser) -> None:
    """--vmm-kernel, --vmm-cpus and --vmm-memory."""
    group = parser.getgroup("vmm", "vmm virtual machines")
    group.addoption("--vmm-kernel", default=None,
                    help="kernel for the vmm_machine fixture (path, 'debian', 'build:7.3')")
    group.addoption("--vmm-cpus", type=int, default=None, help="default vCPU count")
    group.addoption("--vmm-memory", default=None, help="default guest RAM, e.g. 512M")
    group.addoption("--vmm-evidence", choices=("failure", "always", "never"), default="failure",
                    help="attach a vmm test's evidence (console, exit, sched_ext state, stalls, "
                         "dump, vmcore, machine) to its report: on failure (default), always, "
                         "or never (then only the console tail on failure)")
    group.addoption("--vmm-evidence-dir", default=None, metavar="DIR",
                    help="save each test's evidence under DIR/<test>/ for `vmm report DIR` "
                         "(default: a new vmm-evidence-* directory under the temp dir)")


def pytest_configure(config: pytest.Config) -> None:
    """Register the vmm marker and start an empty machine pool."""
    config.addinivalue_line(
        "markers", "vmm(**options): options for the vmm_machine fixture "
        "(kernel, cpus, memory, cmdline, initrd, wait_for, wait_timeout, timeout, fresh, "
        "clone, exec, include, topology)")
    config.addinivalue_line(
        "markers", "vmm_gauntlet(presets=None, budget_s=None): run the test once per topology "
        "preset (all when presets is None), vmm_machine built with it, the whole gauntlet within budget_s seconds")
    config.stash[_POOL_KEY] = {}
    config.stash[_SNAPSHOT_KEY] = {}
    config.stash[_EVIDENCE_KEY] = []


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop every pooled machine."""
    pool = config.stash.get(_POOL_KEY, {})
    for machine in pool.values():
        _stop_quietly(machine)
    pool.clear()
    snapshots = config.stash.get(_SNAPSHOT_KEY, {})
    for pool in snapshots.values():
        pool.close()
        pool.snapshot.close()
    snapshots.clear()


def _stop_quietly(machine: Any) -> None:
    try:
        machine.stop()
    except Exception:  # teardown must not mask the test's own result
        pass


def _pool_key(opts: dict, wait_for: Any) -> str:
    """What makes two machines the same: every option, the boot marker waited for
    (a machine booted without waiting is not one that reached a later marker), and for
    a kernel given as a file, which file contents (a rebuilt kernel is another kernel)."""
    import os

    items = dict(opts, wait_for=wait_for)
    kernel = opts.get("kernel")
    if isinstance(kernel, (str, os.PathLike)) and os.path.exists(kernel):
        st = os.stat(kernel)
        items["kernel file"] = (os.path.realpath(kernel), st.st_size, st.st_mtime_ns)
    return repr(sorted((str(k), repr(v)) for k, v in items.items()))


def _options(request: pytest.FixtureRequest) -> dict:
    cfg = request.config
    opts: dict = {}
    if cfg.getoption("--vmm-kernel"):
        opts["kernel"] = cfg.getoption("--vmm-kernel")
    if cfg.getoption("--vmm-cpus"):
        opts["cpus"] = cfg.getoption("--vmm-cpus")
    if cfg.getoption("--vmm-memory"):
        opts["memory"] = cfg.getoption("--vmm-memory")
    # Closest marker wins (function over class over module).
    for mark in reversed(list(request.node.iter_markers("vmm"))):
        opts.update(mark.kwargs)
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and "vmm_preset" in callspec.params:  # a vmm_gauntlet variant
        opts["topology"] = callspec.params["vmm_preset"]
        opts.pop("cpus", None)  # the topology implies it
        budget = request.node.get_closest_marker("vmm_gauntlet").kwargs.get("budget_s")
        if budget:
            left = budget - _gauntlet_elapsed(request)
            if left <= 0:
                pytest.fail(f"vmm_gauntlet: its budget of {budget} s was spent before variant "
                            f"{opts['topology']!r} started (the budget counts from the first "
                            f"variant's start, across this host's xdist workers)", pytrace=False)
            opts["timeout"] = min(opts.get("timeout") or left, left)
            opts["wait_timeout"] = min(opts.get("wait_timeout", 60.0), left)
    if "kernel" not in opts:
        raise pytest.UsageError("vmm_machine needs a kernel: pass --vmm-kernel or "
                                "@pytest.mark.vmm(kernel=...)")
    return opts


def _gauntlet_elapsed(request: pytest.FixtureRequest) -> float:
    """Seconds since the first variant of this gauntlet started on this host: its start
    time is a file the first variant creates (O_EXCL) where every xdist worker of the
    run sees it (the workers' common base temp directory, named by the run's id)."""
    import hashlib
    import os
    import time

    base = request.getfixturevalue("tmp_path_factory").getbasetemp()
    worker = getattr(request.config, "workerinput", None)
    run = worker.get("testrunuid", "") if worker else ""
    root = base.parent if worker else base
    name = hashlib.sha1(f"{run} {request.node.nodeid.split('[')[0]}".encode()).hexdigest()[:16]
    path = root / f"vmm-gauntlet-{name}"
    now = time.time()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(repr(now))
        return 0.0
    except FileExistsError:
        for _ in range(50):  # the first variant may be writing it this very moment
            try:
                return max(0.0, now - float(path.read_text()))
            except ValueError:
                time.sleep(0.01)
        return 0.0


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A vmm_gauntlet test becomes one item per preset, named by it."""
    mark = metafunc.definition.get_closest_marker("vmm_gauntlet")
    if mark is None:
        return
    from .topology import presets

    names = mark.kwargs.get("presets") or list(presets())
    unknown = [n for n in names if n not in presets()]
    if unknown:
        raise pytest.UsageError(f"vmm_gauntlet: unknown presets {unknown}; vmm.topology.presets() "
                                f"has {', '.join(presets())}")
    if "vmm_preset" not in metafunc.fixturenames:
        metafunc.fixturenames.append("vmm_preset")
    metafunc.parametrize("vmm_preset", names, ids=names)


@pytest.fixture
def vmm_preset(request: pytest.FixtureRequest) -> Any:
    """The topology preset of a vmm_gauntlet variant (None outside a gauntlet)."""
    return getattr(request, "param", None)


@pytest.fixture
def vmm_machine(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A running vmm.Machine for the test; see the module docstring."""
    from . import Machine

    opts = _options(request)
    fresh = bool(opts.pop("fresh", False))
    clone = bool(opts.pop("clone", False))
    wait_for = opts.pop("wait_for", None)
    wait_timeout = opts.pop("wait_timeout", 60.0)
    key = _pool_key(opts, wait_for)
    pool = request.config.stash[_POOL_KEY]
    if clone:
        machine = _clone(request.config.stash[_SNAPSHOT_KEY], key, opts, wait_for, wait_timeout)
        machine.dirty = False
        request.node.stash[_MACHINE_KEY] = machine
        yield machine
        _stop_quietly(machine)
        return

    machine = None if fresh else pool.pop(key, None)
    if machine is not None and not machine.running:
        _stop_quietly(machine)
        machine = None
    if machine is None:
        machine = Machine(**opts)
        machine.start()
        if wait_for:
            machine.wait_for_console(wait_for, timeout=wait_timeout)
    machine.dirty = False
    for kept in ("_monitors", "_stall_watches"):  # a reused machine: this test's evidence only
        machine.__dict__.pop(kept, None)
    request.node.stash[_MACHINE_KEY] = machine
    yield machine
    if fresh or machine.dirty or not machine.running:
        _stop_quietly(machine)
    else:
        pool[key] = machine


def _clone(snapshots: dict, key: str, opts: dict, wait_for: Any, wait_timeout: float) -> Any:
    """A running clone of the template these options boot (booted and snapshotted once)."""
    from . import Machine

    pool = snapshots.get(key)
    if pool is None:
        template = Machine(**opts)
        template.start()
        try:
            if wait_for:
                template.wait_for_console(wait_for, timeout=wait_timeout)
            snap = template.snapshot()
        finally:
            _stop_quietly(template)
        # The next test's VM and vCPUs are made while this one runs (vmm.runtime.clone_pool).
        pool = snapshots[key] = Machine.clone_pool(snap)
    return pool.clone()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """On failure (or always, --vmm-evidence=always), attach the machine's evidence to the
    report; with --vmm-evidence=never, only the console tail and state on failure."""
    report = yield
    machine = item.stash.get(_MACHINE_KEY, None)
    mode = item.config.getoption("--vmm-evidence", "failure")
    if machine is not None and mode != "never" and (report.when == "call" or report.failed) \
            and (report.failed or mode == "always"):
        _attach_evidence(item, report, machine)
    elif machine is not None and report.failed:
        try:
            report.sections.append(("vmm console (tail)", machine.console_tail(50)))
            report.sections.append(("vmm state", machine.describe_state()))
        except Exception as exc:  # never hide the real failure
            report.sections.append(("vmm", f"could not collect the console: {exc}"))
    return report


def _evidence_dir(config: pytest.Config) -> str:
    import tempfile

    base = config.getoption("--vmm-evidence-dir", None)
    if not base:
        base = getattr(config, "_vmm_evidence_base", None) or tempfile.mkdtemp(prefix="vmm-evidence-")
        config._vmm_evidence_base = base  # one per session
    return base


def _attach_evidence(item: pytest.Item, report: pytest.TestReport, machine: Any) -> None:
    """The machine's evidence (vmm.report.evidence) as report sections, JUnit properties
    (on the item: the teardown report carries them into the XML), pytest-html extras when
    that plugin is installed, a saved directory, and a terminal summary entry."""
    import os
    import re

    try:
        from .report.evidence import collect

        outcome = report.outcome if report.when == "call" else f"{report.outcome} in {report.when}"
        ev = collect(machine, item.nodeid, outcome)
        directory = os.path.join(_evidence_dir(item.config),
                                 re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid)[-120:])
        ev.save(directory)
    except Exception as exc:  # never hide the real failure
        report.sections.append(("vmm", f"could not collect the evidence: {type(exc).__name__}: {exc}"))
        return
    report.sections.extend(ev.sections)
    props = ev.properties + [("vmm.evidence", directory)] + [("vmm.plot", os.path.join(directory, p))
                                                            for p in ev.plots]
    item.user_properties.extend(props)
    report.user_properties = list(report.user_properties) + props
    _html_extras(report, directory, ev)
    item.config.stash[_EVIDENCE_KEY].append((item.nodeid, outcome, directory, ev))


def _html_extras(report: pytest.TestReport, directory: str, ev: Any) -> None:
    """pytest-html's extras (its plots as images), only when pytest-html is installed."""
    try:
        from pytest_html import extras
    except ImportError:
        return
    import base64
    import os

    added = []
    for name in ev.plots:
        with open(os.path.join(directory, name), "rb") as f:
            added.append(extras.png(base64.b64encode(f.read()).decode("ascii"), name=name))
    report.extras = list(getattr(report, "extras", [])) + added


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """One entry per test with evidence: what the VM and sched_ext said, stalls, where the
    evidence is and how to see it as a page."""
    entries = config.stash.get(_EVIDENCE_KEY, [])
    if not entries:
        return
    tr = terminalreporter
    tr.write_sep("=", "vmm evidence")
    notes = set()
    for nodeid, outcome, directory, ev in entries:
        props = dict(ev.properties)
        tr.write_line(f"{nodeid}: {outcome}")
        tr.write_line(f"  exit: {props.get('vmm.exit')}; sched_ext: {props.get('vmm.sched_ext')}; "
                      f"stalls: {props.get('vmm.stalls')}")
        if props.get("vmm.vmcore"):
            tr.write_line(f"  vmcore: {props['vmm.vmcore']}")
        tr.write_line(f"  evidence: {directory} (vmm report {directory})")
        notes.update(ev.notes)
    for note in sorted(notes):
        tr.write_line(f"vmm: {note}")
