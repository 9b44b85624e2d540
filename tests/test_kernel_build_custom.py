"""vmm kernel build from the developer's own tree (--source) or config (--config),
orchestrated against a stand-in Kbuild tree (the real build is a slow test's job)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmm import kernelstore as ks
from vmm.errors import KernelStoreError

ROOT = Path(__file__).resolve().parents[1]

FAKE_MAKEFILE = r"""
O ?= .
tinyconfig:
	printf 'CONFIG_64BIT=y\n# CONFIG_SMP is not set\n' > $(O)/.config
olddefconfig:
	@echo "  olddefconfig"
bzImage:
	mkdir -p $(O)/arch/x86/boot
	echo bz > $(O)/arch/x86/boot/bzImage
	echo elf > $(O)/vmlinux
	echo "ffffffff81000000 T _text" > $(O)/System.map
	@echo "  CC      kernel/sched/ext.o"
	@echo built >> $(O)/builds
kernelrelease:
	@echo 7.3.0-dev
"""


@pytest.fixture
def tree(tmp_path, monkeypatch):
    if shutil.which("make") is None:
        pytest.skip("needs make")
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(ks.build, "_check_build_tools", lambda: None)
    t = tmp_path / "linux"
    t.mkdir()
    (t / "Makefile").write_text(FAKE_MAKEFILE)
    (t / "Kbuild").write_text("")
    (t / "Kconfig").write_text("")
    return t


def test_build_from_own_tree_out_of_tree_with_progress(tree):
    lines = []
    art = ks.build_kernel(source=tree, progress=lines.append)
    assert art.version == "7.3.0-dev" and art.bzimage.read_text() == "bz\n"
    cfg = ks.parse_config(art.config.read_text())
    assert cfg["CONFIG_SMP"] == "y" and cfg["CONFIG_SCHED_CLASS_EXT"] == "y"  # fragment merged
    assert any("kernel/sched/ext.o" in ln for ln in lines)          # make's output streamed
    assert not (tree / ".config").exists()                          # the tree is left alone
    assert ks.list_kernels() == [art]                               # in the shared store
    again = ks.build_kernel(source=tree, progress=lambda s: None)   # make runs again
    assert again == art
    obj = ks.cache_root() / "build" / art.name.removeprefix("build-") / "obj"
    assert (obj / "builds").read_text() == "built\nbuilt\n"


def test_build_from_own_config(tree, tmp_path):
    my = tmp_path / "my.config"
    my.write_text("CONFIG_MY_DRIVER=y\n# CONFIG_SMP is not set\n")
    art = ks.build_kernel(source=tree, config=my, progress=lambda s: None)
    cfg = ks.parse_config(art.config.read_text())
    assert cfg["CONFIG_MY_DRIVER"] == "y" and cfg["CONFIG_SMP"] == "y"
    other = ks.build_kernel(source=tree, progress=lambda s: None)
    assert other.name != art.name  # another config, another store entry


def test_tree_with_in_tree_build_is_refused(tree):
    (tree / ".config").write_text("CONFIG_SMP=y\n")
    with pytest.raises(KernelStoreError, match="in-tree build.*vmm run --kernel"):
        ks.build_kernel(source=tree)


def test_not_a_source_tree(tmp_path, monkeypatch):
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(KernelStoreError, match="not a Linux source tree"):
        ks.build_kernel(source=tmp_path)


def test_default_build_key_unchanged():
    """The Debian-source build keeps its cache key: <version>-<fragment hash>."""
    assert ks.DEFAULT_FRAGMENT.name == "sched_ext.fragment"
    assert ks.fragment_hash(ks.DEFAULT_FRAGMENT) == ks.fragment_hash(
        ROOT / "kernels/config/sched_ext.fragment")


def test_scx_flavour_is_the_default_fragment_plus_its_options(tmp_path, monkeypatch):
    """build:7.3+scx: the default fragment, byte for byte, then what the tree's
    schedulers need (so the two kernels differ only there); specs resolve to it, and an
    unknown flavour is refused by name."""
    base = ks.DEFAULT_FRAGMENT.read_text()
    scx = ks.FLAVOURS["scx"].read_text()
    assert scx.startswith(base) and len(scx) > len(base)
    extra = ks.parse_config(scx[len(base):])
    for option in ("CONFIG_NET", "CONFIG_FTRACE", "CONFIG_FUNCTION_TRACER", "CONFIG_BPF_EVENTS",
                   "CONFIG_MAGIC_SYSRQ"):
        assert extra.get(option) == "y", option
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path / "cache"))
    seen = []
    monkeypatch.setattr("vmm.kernelstore.resolve.build_kernel",
                        lambda version, fragment=None: seen.append((version, fragment)))
    ks.resolve_kernel("build:7.3+scx")
    ks.resolve_kernel("build")
    assert seen == [("7.3", ks.FLAVOURS["scx"]), ("7.3", None)]
    with pytest.raises(KernelStoreError, match="no flavour 'nope'"):
        ks.resolve_kernel("build:7.3+nope")


def test_merge_fragment():
    out = ks.merge_fragment("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=1\n",
                            "CONFIG_B=y\nCONFIG_C=n\n")
    assert ks.parse_config(out) == {"CONFIG_A": "y", "CONFIG_B": "y", "CONFIG_C": "n"}


@pytest.mark.skipif(any(shutil.which(t) is None for t in ks.BUILD_TOOLS),
                    reason="needs the kernel build tools (make gcc flex bison bc pahole ...)")
def test_cli_kernel_build_source(tmp_path):
    t = tmp_path / "linux"
    t.mkdir()
    (t / "Makefile").write_text(FAKE_MAKEFILE)
    (t / "Kbuild").write_text("")
    (t / "Kconfig").write_text("")
    env = dict(os.environ, PYTHONPATH=str(ROOT), VMM_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "vmm.cli", "kernel", "build", "--source", str(t),
                        "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["version"] == "7.3.0-dev"
    assert "kernel/sched/ext.o" in r.stderr
