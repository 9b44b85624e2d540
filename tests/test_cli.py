"""The vmm command line, end to end on our test guest (real KVM)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vmm.cli import main, parse_size

ROOT = Path(__file__).resolve().parents[1]
GUEST = ROOT / "kernels/guests/out/guest.elf"
needs_guest = [
    pytest.mark.kvm,
    pytest.mark.skipif(not GUEST.exists(), reason="test guest not built: make guests"),
]


def vmm(*args, **kw):
    return subprocess.run([sys.executable, "-m", "vmm.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, **kw)


def test_sizes():
    assert parse_size("512M") == 512 << 20 and parse_size("2G") == 2 << 30
    assert parse_size("1GiB") == 1 << 30 and parse_size("65536") == 65536


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_help_shows_examples():
    r = vmm("run", "--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "--inject-scx" in r.stdout


@pytest.mark.parametrize("mark", [needs_guest])
def test_run_passes_the_guest_exit_code_through(mark):
    r = vmm("run", "--kernel", str(GUEST), "--cmdline", "mode=hello exit=3")
    assert r.returncode == 3, r.stderr
    assert "vmm-guest: hello" in r.stdout
    assert "exit-code" in r.stderr


@pytest.mark.parametrize("mark", [needs_guest])
def test_crash_gives_255_and_says_why(mark):
    r = vmm("run", "--kernel", str(GUEST), "--cmdline", "mode=triple")
    assert r.returncode == 255 and "shutdown" in r.stderr


@pytest.mark.parametrize("mark", [needs_guest])
def test_timeout_gives_255(mark):
    r = vmm("run", "--kernel", str(GUEST), "--cmdline", "mode=loop", "--timeout", "1")
    assert r.returncode == 255 and "timeout" in r.stderr


def test_missing_kernel_is_a_clear_error():
    r = vmm("run", "--kernel", "/nonexistent/bzImage")
    assert r.returncode == 1 and "vmm: error:" in r.stderr and "/nonexistent/bzImage" in r.stderr
    assert "Traceback" not in r.stderr


def test_corrupt_kernel_is_a_clear_error(tmp_path):
    bad = tmp_path / "bzImage"
    bad.write_bytes(b"\x7fELF" + b"\0" * 60)
    r = vmm("run", "--kernel", str(bad))
    assert r.returncode == 1 and "vmm: error:" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("mark", [needs_guest])
def test_symbols_and_btf(mark):
    r = vmm("symbols", str(GUEST), "runqueues")
    assert r.returncode == 0 and "runqueues" in r.stdout
    r = vmm("symbols", str(GUEST), "runqueus")
    assert r.returncode == 1 and "runqueues" in r.stderr  # did you mean
    r = vmm("btf", str(GUEST), "struct scx_rq", "flags", "--json")
    assert r.returncode == 0, r.stderr
    field = json.loads(r.stdout)
    assert field["offset"] == 40 and field["size"] == 4
    r = vmm("btf", str(GUEST), "struct rq")
    assert r.returncode == 0 and "scx" in r.stdout
    r = vmm("btf", str(GUEST), "struct rq", "scx.flagz")
    assert r.returncode == 1 and "flags" in r.stderr


@pytest.mark.parametrize("mark", [needs_guest])
def test_inject_json_on_the_test_guest(mark):
    r = vmm("inject", "--kernel", str(GUEST), "--cpus", "2",
            "--cmdline", "mode=loop cpus=2", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    inj = report["injection"]
    assert inj["ok"] and inj["mask"] == 32 and len(inj["cpus"]) == 2
    for row in inj["cpus"]:
        assert row["clock_after"] == inj["clock"]
        assert row["flags_after"] == row["flags_before"] | 32
    assert report["exit"]["reason"] == "stopped"
