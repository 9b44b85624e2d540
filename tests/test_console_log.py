"""ConsoleLog (vmm/machine/console_log.py): the bounded window, its counters, the file
that gets every byte, the panic scan across appends and the incremental search."""

import os
import re
import stat
import threading
import time

import pytest

from vmm.errors import ConfigError
from vmm.machine.console_log import (DEFAULT_WINDOW, MIN_WINDOW, PANIC_MARKER, SCAN_OVERLAP,
                                     ConsoleLog, parse_window)


def test_default_window_keeps_everything_below_it():
    log = ConsoleLog()
    assert log.window == DEFAULT_WINDOW
    log.append(b"hello\n")
    log.append(b"world\n")
    assert log.text() == "hello\nworld\n" and log.as_bytes() == b"hello\nworld\n"
    assert (log.total, log.dropped) == (12, 0)
    assert log.tail(6) == "world\n"


def test_window_is_bounded_and_counts_what_it_dropped():
    log = ConsoleLog(window="4K")
    assert log.window == 4096
    line = b"0123456789abcdef" * 4 + b"\n"  # 65 bytes
    for _ in range(1000):
        log.append(line)
    assert log.total == 65 * 1000
    assert len(log.as_bytes()) == 4096 and log.dropped == 65 * 1000 - 4096
    assert log.as_bytes() == (line * 1000)[-4096:]
    assert log.text() == log.as_bytes().decode()
    # One append bigger than the window keeps its last bytes.
    big = bytes(range(256)) * 64
    log.append(big)
    assert log.as_bytes() == big[-4096:] and log.total == 65 * 1000 + len(big)


@pytest.mark.parametrize("bad", [0, 100, MIN_WINDOW - 1, "1K", "lots", True, 1.5, None])
def test_bad_windows_are_refused(bad):
    with pytest.raises(ConfigError, match="console_window"):
        parse_window(bad)


def test_file_gets_everything_owner_only(tmp_path):
    path = tmp_path / "console.log"
    path.write_bytes(b"old contents that must go")
    os.chmod(path, 0o644)
    log = ConsoleLog(window=MIN_WINDOW, path=path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_bytes() == b""  # truncated
    chunks = [f"line {i} ".encode() * 7 + b"\n" for i in range(2000)]
    for c in chunks:
        log.append(c)
    assert path.read_bytes() == b"".join(chunks)  # unbuffered: there before close
    log.close()
    log.append(b"after close\n")  # reaches the window only
    assert path.read_bytes() == b"".join(chunks)
    assert log.text().endswith("after close\n") and log.dropped > 0


def test_new_file_is_created_0600(tmp_path):
    path = tmp_path / "new.log"
    old = os.umask(0)
    try:
        ConsoleLog(path=str(path)).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_unopenable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="console log file"):
        ConsoleLog(path=tmp_path / "no" / "such" / "dir.log")


def test_panic_found_across_appends_and_after_drops():
    marker = PANIC_MARKER
    for cut in range(1, len(marker)):
        log = ConsoleLog(window=MIN_WINDOW)
        log.append(b"x" * 10000)  # the window has dropped bytes already
        assert not log.append(b"noise\n" + marker[:cut])
        assert log.append(marker[cut:] + b": Attempted to kill init!\n")
        assert log.panic_line() == "Kernel panic - not syncing: Attempted to kill init!"
    log = ConsoleLog()
    for b in marker:  # a byte at a time
        panicked = log.append(bytes([b]))
    assert panicked
    assert not ConsoleLog().append(b"Kernel panic - not")


def test_scan_finds_a_match_split_across_appends():
    log = ConsoleLog()
    scan = log.scan(r"vmm-guest: reply: (.*)\r?\nvmm-guest: after")
    log.append(b"boot\nvmm-guest: rep")
    assert scan.search() is None
    log.append(b"ly: 1 ok\r\nvmm-gue")
    assert scan.search() is None
    log.append(b"st: after the reply\n")
    m = scan.search()
    assert m and m.group(1) == "1 ok\r"
    assert log.as_bytes()[scan.start_offset:scan.end_offset] == m.group(0).encode()


def test_scan_cost_is_the_new_data_plus_the_overlap():
    log = ConsoleLog(window="1M")
    scan = log.scan(r"marker-7\b")
    line = b"some console line that is not the marker\n"
    for _ in range(200):
        for _ in range(100):
            log.append(line)
        assert scan.search() is None
    before = scan.scanned_bytes
    log.append(line * 100)
    assert scan.search() is None
    assert scan.scanned_bytes - before <= len(line) * 100 + SCAN_OVERLAP + 1
    log.append(b"marker-7\n")
    assert scan.search().group(0) == "marker-7"
    # Nothing new: no work at all.
    done = scan.scanned_bytes
    assert scan.search() is None and scan.scanned_bytes == done


def test_scan_positions_survive_the_window_moving():
    log = ConsoleLog(window=MIN_WINDOW)
    for i in range(1000):
        log.append(f"tick {i}\n".encode())
    start = log.total
    scan = log.scan(r"tick (\d+)", start=start)  # only what comes after `start`
    assert scan.search() is None
    for i in range(1000, 3000):
        log.append(f"tick {i}\n".encode())
        if i == 1000:
            m = scan.search()
            assert m.group(1) == "1000"
    assert log.dropped > start
    # A fresh scan from a dropped offset starts at the window.
    late = log.scan(r"tick (\d+)", start=start)
    m = late.search()
    assert int(m.group(1)) > 1000 and late.start_offset >= log.dropped


def test_scan_matches_like_a_full_search_for_short_matches():
    """Random splits of a text: the incremental scan finds the same first match as a
    search of the whole text (^ and \\b keep their meaning at a piece's edge)."""
    import random

    rng = random.Random(24)
    text = "".join(f"[{i:5d}] cpu{rng.randrange(4)} {'word ' * rng.randrange(8)}\n"
                   for i in range(3000)).encode()
    patterns = [r"^\[ 2345\]", r"\bcpu3 word word word word word word word\n\[", r"(?m)^\[ 1000\] cpu\d",
                r"\[ 2999\].*\n", r"ord\n\[ 1500", r"(?m)^\[ 4000\]"]
    for pattern in patterns:
        full = re.search(pattern, text.decode())
        log = ConsoleLog(window="1M")
        scan = log.scan(pattern)
        found = None
        pos = 0
        while pos < len(text) and found is None:
            n = rng.randrange(1, 300)
            log.append(text[pos:pos + n])
            pos += n
            found = scan.search()
        if full is None:
            assert found is None, pattern
        else:
            assert found is not None, pattern
            assert found.group(0) == full.group(0), pattern
            assert scan.start_offset == full.start(), pattern


def test_scan_does_not_match_start_anchor_mid_stream():
    log = ConsoleLog()
    log.append(b"first\n")
    scan = log.scan(r"^second")  # without MULTILINE, ^ is the console's very start
    scan.search()
    log.append(b"second\n")
    assert scan.search() is None
    assert log.scan(r"(?m)^second", start=0).search() is not None


def test_scan_counts_bytes_dropped_before_it_looked():
    log = ConsoleLog(window=MIN_WINDOW)
    scan = log.scan("never")
    scan.search()
    log.append(b"y" * 3 * MIN_WINDOW)
    assert scan.search() is None
    assert scan.missed_bytes == 2 * MIN_WINDOW


def test_text_utf8_split_across_appends():
    log = ConsoleLog()
    data = "é€ok\n".encode()
    scan = log.scan("€ok")
    for i in range(len(data)):
        log.append(data[i:i + 1])
        m = scan.search()
    assert m and log.text() == "é€ok\n"


def test_waiters_wake_on_append():
    log = ConsoleLog()
    scan = log.scan("ready")
    got = []

    def waiter():
        deadline = time.monotonic() + 10
        with log.changed:
            while time.monotonic() < deadline:
                m = scan.search_locked()
                if m:
                    got.append(m.group(0))
                    return
                log.changed.wait(1)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.05)
    log.append(b"not yet\n")
    log.append(b"ready\n")
    t.join(10)
    assert got == ["ready"]
