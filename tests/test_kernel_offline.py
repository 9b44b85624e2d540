"""Kernels already in the store work offline: no apt, no network on the cached path."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmm import kernelstore as ks
from vmm.errors import KernelStoreError

ROOT = Path(__file__).resolve().parents[1]
GUEST = ROOT / "kernels/guests/out/guest.elf"
needs_guest = pytest.mark.skipif(not GUEST.exists(), reason="test guest not built: make guests")
needs_kvm = pytest.mark.kvm
pytestmark = [needs_guest,
              pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path))
    return tmp_path / "kernels"


@pytest.fixture
def offline(monkeypatch):
    """The fetch layer fails as it does without a network; the calls are recorded
    (the cached path must make none)."""
    calls = []

    def no_apt(self, *a, **k):
        calls.append(a)
        raise KernelStoreError("apt-get update failed: network unreachable (test)")
    monkeypatch.setattr(ks.PrivateApt, "_run", no_apt)
    monkeypatch.setattr(ks.PrivateApt, "update", no_apt)
    return calls


def cached(store: Path, kind: str, name: str, version: str, *, system_map=True,
           entry_name=None) -> ks.KernelArtifacts:
    out = store / kind / name
    out.mkdir(parents=True)
    shutil.copy(GUEST, out / "vmlinux")
    smap = None
    if system_map:
        nm = subprocess.run(["nm", "-n", str(GUEST)], check=True, capture_output=True, text=True)
        smap = out / "System.map"
        smap.write_text(nm.stdout)
    (out / "config").write_text("CONFIG_SMP=y\n")
    art = ks.KernelArtifacts(entry_name or f"{kind}-{name}", version, None, out / "vmlinux",
                             smap, out / "config")
    ks._write_manifest(out, art, source=kind)
    return art


def test_cached_build_resolves_offline(store, offline):
    art = cached(store, "build", f"7.3-{ks.fragment_hash(ks.DEFAULT_FRAGMENT)}", "7.3.0")
    assert ks.resolve_kernel("build:7.3") == art
    assert ks.build_kernel("7.3") == art
    assert offline == []


def test_cached_debian_with_symbols_offline(store, offline):
    cached(store, "debian", "7.3.4+deb13-cloud-amd64", "7.3.4", system_map=False,
           entry_name="debian-7.3.4+deb13-cloud-amd64")
    dbg = cached(store, "debian", "7.3.3+deb13-cloud-amd64", "7.3.3",
                 entry_name="debian-7.3.3+deb13-cloud-amd64")
    assert ks.resolve_kernel("debian+dbg") == dbg
    assert offline == []
    # fetch_debian with the network gone falls back to what the store holds.
    assert ks.fetch_debian(with_debug=True, progress=lambda s: None) == dbg


def test_fetch_debian_offline_without_cache_names_the_problem(store, offline):
    with pytest.raises(KernelStoreError, match="network unreachable"):
        ks.fetch_debian(progress=lambda s: None)


@needs_kvm
def test_machine_on_cached_debian_loads_symbols_offline(store, offline):
    from vmm import Machine

    cached(store, "debian", "7.3.4+deb13-cloud-amd64", "7.3.4", system_map=False,
           entry_name="debian-7.3.4+deb13-cloud-amd64")
    cached(store, "debian", "7.3.3+deb13-cloud-amd64", "7.3.3",
           entry_name="debian-7.3.3+deb13-cloud-amd64")
    m = Machine(kernel="debian", cmdline="mode=hello exit=0")
    try:
        assert m.kernel_image.symbol("runqueues")  # the -dbg entry's symbols, no apt call
        assert offline == []
    finally:
        m.stop()


@needs_kvm
def test_cli_run_cached_build_without_apt_on_path(store, tmp_path):
    cached(store, "build", f"7.3-{ks.fragment_hash(ks.DEFAULT_FRAGMENT)}", "7.3.0")
    bin_dir = tmp_path / "bin"   # a PATH without apt-get, apt-cache or dpkg-deb
    bin_dir.mkdir()
    for tool in ("gcc", "ld", "as", "nm"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    env = dict(os.environ, PATH=str(bin_dir), PYTHONPATH=str(ROOT),
               VMM_CACHE_DIR=str(store.parent), http_proxy="http://127.0.0.1:9",
               https_proxy="http://127.0.0.1:9")
    r = subprocess.run([sys.executable, "-m", "vmm.cli", "run", "--kernel", "build:7.3",
                        "--cmdline", "mode=hello exit=3"], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 3, r.stderr
