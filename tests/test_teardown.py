"""stop() racing everything that points into the VM: never a host fault.

Each scenario runs in a subprocess so that a SIGSEGV/SIGABRT fails the test instead of
killing pytest. After stop() every access gets a VmmError."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from guest_abi import require_guests

REPO = Path(__file__).resolve().parents[1]
GUEST = REPO / "kernels" / "guests" / "out" / "guest.elf"
ROUNDS = int(os.environ.get("VMM_TEARDOWN_ROUNDS", "4"))

PRELUDE = textwrap.dedent(f"""
    import sys, threading, time
    sys.path.insert(0, {str(REPO)!r})
    from vmm import Machine, KernelTarget as T, KernelValue as V
    from vmm.errors import VmmError
    GUEST = {str(GUEST)!r}
    def machine(cpus=1):
        m = Machine(GUEST, cpus=cpus, cmdline=f"mode=loop cpus={{cpus}}", memory="64M",
                    console=None, timeout=60)
        m.start()
        m.wait_for_console(f"{{cpus}} cpus up", timeout=60)
        return m
""")


def run_script(body: str, timeout: float = 120) -> str:
    require_guests(GUEST)
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, (
        f"subprocess ended with {proc.returncode} (negative: killed by that signal)\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc.stdout


def test_stop_inside_freeze_block():
    out = run_script(f"""
        for _ in range({ROUNDS}):
            m = machine(2)
            with m.freeze():
                m.stop()
            # the freeze block ended after stop(): nothing to thaw, no fault
            try:
                m.freeze()
            except VmmError as e:
                pass
            else:
                raise SystemExit("freeze() after stop() did not refuse")
            try:
                m.memory.read(0x1000, 8)
            except VmmError:
                pass
            else:
                raise SystemExit("memory.read after stop() did not refuse")
            # a longer process keeps working: allocate a lot to expose heap damage
            junk = [bytearray(4096) for _ in range(2000)]
            del junk
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_stop_racing_hot_memory_access():
    out = run_script(f"""
        errors = []
        for _ in range({ROUNDS}):
            m = machine(1)
            go = threading.Event()
            def hammer(kind):
                go.set()
                try:
                    while True:
                        if kind == "read":
                            m.memory.read(0x100000, 1 << 20)
                        elif kind == "write":
                            m.memory.write(0x100000, bytes(1 << 20))
                        elif kind == "session":
                            m.write(T.gpa(0x200100), V.u32(1))
                            m.write(T.symbol("jiffies"), V.u64(5))
                        else:
                            m.memory.write_u64(0x200000, 1)
                            m.memory.read_u32(0x200000)
                except VmmError:
                    return  # the expected end: the machine is gone
                except Exception as e:
                    errors.append(repr(e))
            threads = [threading.Thread(target=hammer, args=(k,))
                       for k in ("read", "write", "scalar", "session")]
            for t in threads:
                t.start()
            go.wait()
            time.sleep(0.05)
            m.stop()
            for t in threads:
                t.join(30)
                assert not t.is_alive()
        assert not errors, errors
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_stop_racing_freeze_thaw_and_console():
    out = run_script(f"""
        errors = []
        for r in range({ROUNDS}):
            m = machine(2)
            def freezer():
                try:
                    while True:
                        with m.freeze(timeout=10):
                            m.memory.read_u64(0x1000)
                except VmmError:
                    return
                except Exception as e:
                    errors.append(repr(e))
            def console():
                try:
                    while True:
                        m.console_text()
                        m.unhandled_io
                        m.describe_state()
                except VmmError:
                    return
                except Exception as e:
                    errors.append(repr(e))
            threads = [threading.Thread(target=freezer), threading.Thread(target=freezer),
                       threading.Thread(target=console, daemon=True)]
            for t in threads:
                t.start()
            time.sleep(0.02 * (r % 4))
            m.stop()
            for t in threads[:2]:
                t.join(30)
                assert not t.is_alive()
        assert not errors, errors
        print("ok")
    """)
    assert out.strip().endswith("ok")


@pytest.mark.parametrize("cmdline", ["mode=outloop n=100000000 port=0x600 ring=0",
                                     "mode=outloop n=100000000 port=0x3f8 ring=0",
                                     "mode=outloop n=100000000 port=0x80 ring=0"])
def test_stop_racing_vcpu_exits(cmdline):
    """vCPUs in a storm of exits (to Python: report port, COM1 slow path; in C: an
    unclaimed port) while another thread freezes, reads and drains the console."""
    out = run_script(f"""
        errors = []
        for r in range({ROUNDS}):
            m = Machine(GUEST, cmdline={cmdline!r}, memory="64M", console=None, timeout=60)
            m.start()
            stop = threading.Event()
            def poke():
                try:
                    while not stop.is_set():
                        with m.freeze(timeout=10):
                            m.memory.read(0x1000000, 4096)
                        m.console_text()
                        len(m.reports)
                except VmmError:
                    return
                except Exception as e:
                    errors.append(repr(e))
            t = threading.Thread(target=poke)
            t.start()
            time.sleep(0.01 * (r % 5))
            m.stop()
            stop.set()
            t.join(30)
            assert not t.is_alive()
        assert not errors, errors
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_closed_memory_releases_ram_and_refuses():
    """close() gives the RAM back at once (zero pages over it), keeps the addresses until
    the object is gone, and every later access is a GuestMemoryClosed."""
    from vmm.errors import GuestMemoryClosed
    from vmm.kvm.memory import GuestMemory

    def rss_mib():
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 >> 20

    m = GuestMemory(128 << 20)
    for off in range(0, 128 << 20, 1 << 20):
        m.write(off, b"x" * (1 << 20))
    touched = rss_mib()
    m.close()
    assert rss_mib() < touched - 100
    for call in (lambda: m.read(0, 8), lambda: m.write_u32(0, 1), lambda: m.read_u64(8),
                 lambda: m.fetch_or_u32(0, 1), lambda: m.host_address(0)):
        with pytest.raises(GuestMemoryClosed):
            call()
