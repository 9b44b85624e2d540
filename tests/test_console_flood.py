"""A guest that talks a lot (mode=flood of kernels/guests): the console kept in memory
stays within its window, the log file gets every byte, and waiting on the console costs
the same late in a long run as early (issue 24)."""

import os
import re
import stat
import time
from pathlib import Path

import pytest

from guest_abi import require_guests
from vmm.runtime import Machine

pytestmark = pytest.mark.kvm

REPO = Path(__file__).resolve().parents[1]
GUEST = REPO / "kernels" / "guests" / "out" / "guest.elf"
LINE = 64  # bytes of each "vmm-guest: flood N ....\n" line
FLOOD_RE = re.compile(rb"vmm-guest: flood (\d+) \.+\n")


@pytest.fixture(scope="module")
def guest():
    require_guests(GUEST)
    return GUEST


def _last_line_number(m) -> int:
    found = re.findall(r"vmm-guest: flood (\d+) ", m.console_log.tail(4 * LINE))
    return int(found[-1]) if found else -1


def _check_file(path: Path, total: int) -> int:
    """The file holds every line, in order, nothing lost; returns the line count."""
    data = path.read_bytes()
    assert len(data) == total
    lines = data.split(b"\n")
    tail = lines.pop()  # an unfinished last line when the VM was stopped mid-line
    for i, line in enumerate(lines):
        assert line == _line(i), (i, line)
    assert _line(len(lines)).startswith(tail)
    return len(lines)


def _line(i: int) -> bytes:
    return b"vmm-guest: flood %d " % i + b"." * (LINE - 19 - len(str(i)))


def test_flood_keeps_a_bounded_window_and_the_file_gets_everything(guest, tmp_path):
    path = tmp_path / "console.log"
    window = 16 << 10
    with Machine(guest, cmdline="mode=flood", console_window="16K", console_log=path,
                 timeout=120) as m:
        # Well past the window, and a wait from "now on" for a line not yet printed.
        first = m.wait_for_console(r"vmm-guest: flood (\d+) ", timeout=60)
        assert first.group(1) == "0"
        target = max(2 * window // LINE, _last_line_number(m) + 20)
        match = m.wait_for_console(rf"vmm-guest: flood {target} ", timeout=90,
                                   start=m.console_position())
        assert match.group(0) == f"vmm-guest: flood {target} "
        assert len(m.console_bytes()) <= window
        log = m.console_log
        assert log.dropped > 0 and log.total == log.dropped + len(m.console_bytes())
        # The same pattern from 0 again: its line is gone from the window, so the
        # first one still there is found instead (the window's first full line).
        again = m.wait_for_console(r"vmm-guest: flood (\d+) ", timeout=10)
        assert int(again.group(1)) > 0
    total = m.console_log.total
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert _check_file(path, total) >= target
    assert m.console_text() == path.read_bytes()[-len(m.console_bytes()):].decode()


def test_flood_with_a_line_count_ends_with_every_line_in_the_file(guest, tmp_path):
    path = tmp_path / "console.log"
    n = 500
    with Machine(guest, cmdline=f"mode=flood n={n} exit=4", console_window=4096,
                 console_log=str(path)) as m:
        r = m.wait(timeout=120)
    assert (r.reason, r.exit_code) == ("exit-code", 4), r
    assert r.console_tail.endswith("vmm-guest: flood done\n")
    data = path.read_bytes()
    assert data.endswith(b"vmm-guest: flood done\n")
    assert len(FLOOD_RE.findall(data)) == n and len(data) == m.console_log.total
    assert len(m.console_bytes()) == 4096


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def _timed_wait(m) -> tuple[float, float]:
    """Seconds to wait for a line 20 ahead of the last one printed, and the CPU seconds
    the waiting thread spent meanwhile (the search's own cost)."""
    target = _last_line_number(m) + 20
    t0, c0 = time.monotonic(), time.thread_time()
    m.wait_for_console(rf"vmm-guest: flood {target} ", timeout=60, start=m.console_position())
    return time.monotonic() - t0, time.thread_time() - c0


@pytest.mark.slow
def test_long_flood_keeps_memory_and_waits_flat(guest, tmp_path):
    """Two minutes of flood (VMM_FLOOD_SECONDS): host RSS after a warm-up and at the end
    differ by less than 2 MiB (the console grows by megabytes meanwhile, ~2 MB at the
    16 KiB/s of a loaded PVM host), and a wait for a fresh line takes about as long, and
    as much CPU, late as early."""
    duration = float(os.environ.get("VMM_FLOOD_SECONDS", "120"))
    path = tmp_path / "console.log"
    window = 256 << 10
    with Machine(guest, cmdline="mode=flood", console_window=window, console_log=path,
                 timeout=duration + 120) as m:
        m.wait_for_console(r"vmm-guest: flood 1 ", timeout=60)
        time.sleep(min(20.0, duration / 6))  # warm-up: the window fills, allocators settle
        early, early_cpu = min(_timed_wait(m) for _ in range(3))
        rss_warm, seen_warm = _rss_kib(), m.console_log.total
        t_end = time.monotonic() + duration
        while time.monotonic() < t_end:
            time.sleep(5)
            m.console_text()  # readers of the whole text, as a test would do
        late, late_cpu = min(_timed_wait(m) for _ in range(3))
        rss_end, seen_end = _rss_kib(), m.console_log.total
        assert len(m.console_bytes()) == window
    grown = seen_end - seen_warm
    print(f"flood: {grown} bytes in {duration:g} s ({grown / duration / 1024:.0f} KiB/s); "
          f"RSS {rss_warm} -> {rss_end} KiB; wait for a fresh line early {early * 1000:.0f} ms, "
          f"late {late * 1000:.0f} ms (CPU {early_cpu * 1000:.1f} ms, {late_cpu * 1000:.1f} ms)")
    assert rss_end - rss_warm < 2048, (rss_warm, rss_end, grown)
    assert late < 3 * early + 0.5, (early, late)
    assert late_cpu < 3 * early_cpu + 0.05, (early_cpu, late_cpu)
    assert path.stat().st_size == m.console_log.total
