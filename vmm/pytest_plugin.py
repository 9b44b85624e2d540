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
When a test fails, the console tail and why the VM ended are attached to its report.

Parallel matrices: ``pytest -n auto`` (pytest-xdist) gives each worker its own
machines; parametrize over kernels/CPU counts with ``pytest.mark.vmm`` in
``pytest.param(..., marks=...)``. Across hosts: ``pytest -d --tx ssh=host//python=python3``.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest

_POOL_KEY = pytest.StashKey[dict]()
_MACHINE_KEY = pytest.StashKey[Any]()


def pytest_addoption(parser: pytest.Parser) -> None:
    """--vmm-kernel, --vmm-cpus and --vmm-memory."""
    group = parser.getgroup("vmm", "vmm virtual machines")
    group.addoption("--vmm-kernel", default=None,
                    help="kernel for the vmm_machine fixture (path, 'debian', 'build:7.3')")
    group.addoption("--vmm-cpus", type=int, default=None, help="default vCPU count")
    group.addoption("--vmm-memory", default=None, help="default guest RAM, e.g. 512M")


def pytest_configure(config: pytest.Config) -> None:
    """Register the vmm marker and start an empty machine pool."""
    config.addinivalue_line(
        "markers", "vmm(**options): options for the vmm_machine fixture "
        "(kernel, cpus, memory, cmdline, initrd, wait_for, wait_timeout, timeout, fresh, "
        "exec, include)")
    config.stash[_POOL_KEY] = {}


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop every pooled machine."""
    pool = config.stash.get(_POOL_KEY, {})
    for machine in pool.values():
        _stop_quietly(machine)
    pool.clear()


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
    if "kernel" not in opts:
        raise pytest.UsageError("vmm_machine needs a kernel: pass --vmm-kernel or "
                                "@pytest.mark.vmm(kernel=...)")
    return opts


@pytest.fixture
def vmm_machine(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A running vmm.Machine for the test; see the module docstring."""
    from . import Machine

    opts = _options(request)
    fresh = bool(opts.pop("fresh", False))
    wait_for = opts.pop("wait_for", None)
    wait_timeout = opts.pop("wait_timeout", 60.0)
    key = _pool_key(opts, wait_for)
    pool = request.config.stash[_POOL_KEY]

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
    request.node.stash[_MACHINE_KEY] = machine
    yield machine
    if fresh or machine.dirty or not machine.running:
        _stop_quietly(machine)
    else:
        pool[key] = machine


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """On failure, attach the machine's console tail and state to the report."""
    report = yield
    machine = item.stash.get(_MACHINE_KEY, None)
    if machine is not None and report.failed:
        try:
            report.sections.append(("vmm console (tail)", machine.console_tail(50)))
            report.sections.append(("vmm state", machine.describe_state()))
        except Exception as exc:  # never hide the real failure
            report.sections.append(("vmm", f"could not collect the console: {exc}"))
    return report
