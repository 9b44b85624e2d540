"""The config check before boot: a kernel whose config lacks what the run needs is
refused before the VM starts, naming the CONFIG_ options."""

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmm.errors import KernelFeatureMissing
from vmm.kernel import kconfig

ROOT = Path(__file__).resolve().parents[1]
GUEST = ROOT / "kernels/guests/out/guest.elf"
sys.path.insert(0, str(Path(__file__).parent))
from fuzz.synthetic_images import compress, make_bzimage  # noqa: E402

GOOD = """CONFIG_SMP=y
CONFIG_PRINTK=y
CONFIG_SERIAL_8250=y
CONFIG_SERIAL_8250_CONSOLE=y
CONFIG_BLK_DEV_INITRD=y
CONFIG_DEBUG_INFO_BTF=y
CONFIG_SCHED_CLASS_EXT=y
"""


def test_parse_and_check():
    cfg = kconfig.KernelConfig(kconfig.parse(GOOD), "test")
    cfg.check(["console", "initramfs", "smp", "btf", "sched_ext"])
    bad = kconfig.KernelConfig(kconfig.parse(
        GOOD.replace("CONFIG_SMP=y", "# CONFIG_SMP is not set")
            .replace("CONFIG_SCHED_CLASS_EXT=y\n", "")
            .replace("CONFIG_SERIAL_8250=y", "CONFIG_SERIAL_8250=m")), "my .config")
    with pytest.raises(KernelFeatureMissing) as e:
        bad.check(["console", "smp", "sched_ext"])
    msg = str(e.value)
    assert "my .config" in msg
    for opt in ("CONFIG_SMP", "CONFIG_SCHED_CLASS_EXT", "CONFIG_SERIAL_8250 "):
        assert opt in msg
    bad.check(["initramfs", "btf"])  # what it has is fine


def test_ikconfig_blob_in_an_image(tmp_path):
    img = tmp_path / "vmlinux"
    img.write_bytes(GUEST.read_bytes() + b"IKCFG_ST" + gzip.compress(GOOD.encode()) + b"IKCFG_ED")
    assert kconfig.ikconfig_of_file(img) == GOOD
    found = kconfig.find_config(None, [None, img])
    assert found.values["CONFIG_SCHED_CLASS_EXT"] == "y" and "IKCONFIG" in found.source
    assert kconfig.ikconfig_of_file(GUEST) is None


needs = [pytest.mark.kvm,
         pytest.mark.skipif(not GUEST.exists(), reason="test guest not built: make guests"),
         pytest.mark.skipif(shutil.which("strip") is None, reason="needs strip (binutils)")]


def _bz_with_config(d: Path, config: str) -> Path:
    """Our test guest as a bzImage (so it counts as Linux) with a .config beside it."""
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(GUEST, d / "vmlinux")
    (d / "bzImage").write_bytes(make_bzimage(compress("gzip", GUEST.read_bytes())))
    (d / ".config").write_text(config)
    return d / "bzImage"


def vmm(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "vmm.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120, env=env)


@pytest.mark.parametrize("mark", [needs])
def test_cli_refuses_before_boot_naming_the_options(mark, tmp_path):
    bz = _bz_with_config(tmp_path, GOOD.replace("CONFIG_SMP=y", "# CONFIG_SMP is not set")
                         .replace("CONFIG_SCHED_CLASS_EXT=y", ""))
    r = vmm("run", "--kernel", str(bz), "--cpus", "2", "--cmdline", "mode=loop cpus=2",
            "--wait-for", "2 cpus up", "--inject-scx", "--quiet")
    assert r.returncode == 1, r.stderr
    assert "CONFIG_SMP" in r.stderr and "CONFIG_SCHED_CLASS_EXT" in r.stderr
    assert str(tmp_path / ".config") in r.stderr
    assert "cpus up" not in r.stdout + r.stderr  # refused before the guest ran
    # One CPU, no injection: what it lacks does not matter.
    r = vmm("run", "--kernel", str(bz), "--cmdline", "mode=hello exit=3")
    assert r.returncode == 3, r.stderr
    # --no-config-check boots anyway.
    r = vmm("run", "--kernel", str(bz), "--cpus", "2", "--cmdline", "mode=hello exit=4",
            "--no-config-check")
    assert r.returncode == 4, r.stderr
