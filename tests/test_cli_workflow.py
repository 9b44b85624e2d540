"""The command line as a kernel developer meets it: options after the subcommand,
one clear line for every user error (no tracebacks)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def vmm(*args, env=None, cwd=ROOT):
    e = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "vmm.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120, env=e)


@pytest.mark.parametrize("argv", [["kernel", "list", "--json"], ["kernel", "--json", "list"]])
def test_kernel_list_json_either_order(argv, tmp_path):
    r = vmm(*argv, env={"VMM_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


def test_every_subcommand_takes_json_after_its_name(tmp_path):
    r = vmm("kernel", "path", str(ROOT / "kernels/guests/out/guest.elf"), "--json",
            env={"VMM_CACHE_DIR": str(tmp_path)})
    if not (ROOT / "kernels/guests/out/guest.elf").exists():
        pytest.skip("test guest not built: make guests")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["vmlinux"].endswith("guest.elf")


@pytest.mark.parametrize("argv", [
    ["symbols", "/nonexistent/vmlinux", "jiffies"],
    ["btf", "/nonexistent/vmlinux", "struct rq"],
    ["run", "--kernel", "/nonexistent/bzImage"],
    ["inject", "--kernel", "/nonexistent/bzImage"],
    ["kernel", "path", "/nonexistent/bzImage"],
    ["symbols", "/etc/hostname", "jiffies"],        # not a kernel file
    ["run", "--kernel", "/etc"],                    # a directory without a kernel
])
def test_user_errors_are_one_clear_line(argv):
    r = vmm(*argv)
    assert r.returncode in (1, 2), r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("vmm: error: "), r.stderr
