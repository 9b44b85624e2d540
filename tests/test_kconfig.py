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


JOB_OPTIONS = ("CONFIG_BLK_DEV_INITRD", "CONFIG_RD_GZIP", "CONFIG_BINFMT_ELF", "CONFIG_PROC_FS",
               "CONFIG_SYSFS", "CONFIG_DEVTMPFS", "CONFIG_TTY")
JOB_GOOD = GOOD + "".join(f"{o}=y\n" for o in JOB_OPTIONS if o not in GOOD)


@pytest.mark.parametrize("option", JOB_OPTIONS)
def test_guest_job_needs_name_each_missing_option(option):
    """--exec: the job's /init (a static ELF mounting proc, sysfs and devtmpfs, with
    /dev/console as the job's stdio) in a gzip initramfs; each missing option is named."""
    kconfig.KernelConfig(kconfig.parse(JOB_GOOD), "ok").check(["console", "initramfs", "job"])
    for unset in (f"# {option} is not set", f"{option}=m", ""):
        cfg = kconfig.KernelConfig(kconfig.parse(JOB_GOOD.replace(f"{option}=y", unset)), "t")
        with pytest.raises(KernelFeatureMissing) as e:
            cfg.check(["console", "initramfs", "job"])
        assert f"{option} (" in str(e.value)
        assert str(e.value).count(f"{option} (") == 1  # one option two needs share: once
    # BINFMT_SCRIPT is not needed: the init is not a script
    assert all(opt != "CONFIG_BINFMT_SCRIPT" for _, opt, _ in
               kconfig.KernelConfig({}, "empty").missing(["console", "initramfs", "job"]))


@pytest.mark.parametrize("mark", [needs])
def test_exec_checks_what_the_job_needs_before_boot(mark, tmp_path, monkeypatch):
    """Machine(exec=...) on a kernel whose .config lacks what the job's init needs is
    refused before any vCPU runs (on a PVM host the job is refused earlier still: the
    host check is switched off here to reach the config check)."""
    if shutil.which("busybox") is None:
        pytest.skip("needs busybox-static")
    from vmm import Machine
    from vmm.machine import guestjob

    monkeypatch.setattr(guestjob, "check_host", lambda: None)
    bz = _bz_with_config(tmp_path, GOOD)  # no BINFMT_ELF, PROC_FS, SYSFS, DEVTMPFS, TTY, RD_GZIP
    m = Machine(kernel=str(bz), exec="true")
    with pytest.raises(KernelFeatureMissing) as e:
        m.start()
    m.stop()
    for option in JOB_OPTIONS[1:]:
        assert option in str(e.value), str(e.value)
    assert "CONFIG_BINFMT_SCRIPT" not in str(e.value)
    bz = _bz_with_config(tmp_path / "ok", JOB_GOOD)
    m = Machine(kernel=str(bz), exec="true", cmdline="mode=hello exit=5")
    try:
        m.start()  # the config has what the job needs; our test guest just exits
        assert m.wait(timeout=60).exit_code == 5
    finally:
        m.stop()
