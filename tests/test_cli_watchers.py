"""`vmm run --monitor / --monitor-json / --scx-state` on our test guest (real KVM): what
the run's watchers saw comes back in its report, the samples in an owner-only file."""

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUEST = ROOT / "kernels/guests/out/guest.elf"

pytestmark = [pytest.mark.kvm,
              pytest.mark.skipif(not GUEST.exists(), reason="test guest not built: make guests")]


def vmm(*args):
    return subprocess.run([sys.executable, "-m", "vmm.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_run_monitors_the_run_queues_and_follows_sched_ext(tmp_path):
    out = tmp_path / "monitor.json"
    r = vmm("run", "--kernel", str(GUEST), "--cpus", "2", "--cmdline", "mode=loop cpus=2",
            "--timeout", "3", "--monitor", "0.05", "--monitor-json", str(out), "--scx-state",
            "--json")
    assert r.returncode == 255, r.stderr  # the loop runs out the timeout
    extra = json.loads(r.stdout)["extra"]
    assert extra["monitor"].startswith(tuple(f"{n} samples" for n in range(2, 200))), extra
    assert "CPUs 0,1" in extra["monitor"] and "stalls: none" in extra["monitor"], extra
    # Our test guest mimics the run queues, not sched_ext itself: said, not guessed.
    assert extra["sched_ext"].startswith("not read: "), extra
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    data = json.loads(out.read_text())
    assert data["cpus"] == [0, 1] and len(data["samples"]) >= 2, list(data)
    assert extra["monitor json"] == str(out)


@pytest.mark.parametrize("args, words", [
    (["--monitor", "0"], "positive number"),
    (["--monitor-json", "x.json"], "needs --monitor"),
])
def test_bad_watcher_options_are_usage_errors(args, words):
    r = vmm("run", "--kernel", str(GUEST), *args)
    assert r.returncode == 2 and words in r.stderr, r.stderr
