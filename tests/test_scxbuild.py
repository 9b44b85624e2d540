"""`vmm scx build`: toolchain checks, the tree's scheduler list, the vmlinux.h
completion for kernels without cgroup scheduling, and (slow) a real build of
scx_simple for the store's 7.3 kernel."""

import os
import shutil

import pytest

from vmm import scxbuild
from vmm.errors import VmmError


def test_toolchain_found_or_named(monkeypatch):
    try:
        tools = scxbuild.find_toolchain()
    except scxbuild.ScxBuildError as exc:
        assert "apt-get install" in str(exc)
        return
    major = int(tools.clang_version.split()[1].split(".")[0])
    assert major >= scxbuild.MIN_CLANG


def _config(tmp_path, *options):
    path = tmp_path / "config"
    path.write_text("".join(f"{o}=y\n" for o in options) + "# CONFIG_CGROUP_SCHED is not set\n")
    return path


TREE = ("CONFIG_SCHED_CLASS_EXT", "CONFIG_BPF_SYSCALL", "CONFIG_BPF_JIT", "CONFIG_DEBUG_INFO_BTF",
        "CONFIG_BPF_EVENTS", "CONFIG_FUNCTION_TRACER")


def test_what_each_scheduler_needs_of_its_kernel(tmp_path):
    """The per-scheduler config check: every tree scheduler needs sched_ext, BPF and the
    fentry program's tracing; the cgroup schedulers need cgroup scheduling too."""
    plain = _config(tmp_path, *TREE)
    assert scxbuild.config_gaps("simple", plain) == []
    assert [o for o, _ in scxbuild.config_gaps("scx_qmap", plain)] == [
        "CONFIG_CGROUP_SCHED", "CONFIG_EXT_GROUP_SCHED"]
    assert [o for o, _ in scxbuild.config_gaps("pair", plain)] == [
        "CONFIG_CGROUP_SCHED", "CONFIG_EXT_GROUP_SCHED"]
    no_trace = _config(tmp_path, *TREE[:4])
    gaps = scxbuild.config_gaps("central", no_trace)
    assert [o for o, _ in gaps] == ["CONFIG_BPF_EVENTS", "CONFIG_FUNCTION_TRACER"]
    text = scxbuild.describe_gaps("central", "build:7.3", gaps)
    assert text.startswith("scx_central cannot attach on build:7.3: its config lacks CONFIG_BPF_EVENTS (")
    assert "bpf_scx_reg" in text and "build:7.3+scx" in text
    assert scxbuild.config_gaps("simple", None) == []  # no config to read: nothing claimed
    assert scxbuild.config_gaps("simple", tmp_path / "absent") == []


def test_a_workload_refuses_a_scheduler_its_kernel_cannot_attach_before_booting(monkeypatch):
    from vmm import session_workload
    from vmm.errors import KernelFeatureMissing

    lacks = [("CONFIG_EXT_GROUP_SCHED", "the cgroup_* ops")]
    monkeypatch.setattr(scxbuild, "build_scheduler", lambda name, kernel, progress=None: scxbuild.Scheduler(
        name, "/nonexistent/scx_flatcg", kernel, "/nonexistent", True, 0.0, lacks))
    monkeypatch.setattr(session_workload, "workload_job", lambda *a, **k: pytest.fail("it booted"))
    with pytest.raises(KernelFeatureMissing, match="scx_flatcg cannot attach on build:7.3: its "
                                                   "config lacks CONFIG_EXT_GROUP_SCHED"):
        session_workload.run_workload("stress-ng", ["--cpu", "1"], 1, kernel="build:7.3",
                                      scheduler="flatcg")


def test_no_clang_names_the_package(monkeypatch):
    monkeypatch.setattr(scxbuild, "CLANG_CANDIDATES", ("clang-does-not-exist",))
    with pytest.raises(scxbuild.ScxBuildError, match="clang >= 16.*apt-get install clang-22"):
        scxbuild.find_toolchain()
    assert issubclass(scxbuild.ScxBuildError, VmmError)


def _fake_tree(tmp_path, compat_fields=("cgroup_set_idle", "hotplug_seq")):
    tree = tmp_path / "linux"
    (tree / "tools" / "sched_ext" / "include" / "scx").mkdir(parents=True)
    (tree / "tools" / "sched_ext" / "Makefile").write_text(
        "c-sched-targets = scx_simple scx_qmap scx_central\n")
    (tree / "tools" / "sched_ext" / "include" / "scx" / "compat.h").write_text("".join(
        f"if (__skel->struct_ops.__ops_name->{f}) x;\n" for f in compat_fields))
    return tree


def test_scheduler_names_from_the_tree(tmp_path):
    assert scxbuild.scheduler_names(_fake_tree(tmp_path)) == ["simple", "qmap", "central"]


def test_vmlinux_h_gets_the_callbacks_compat_h_names(tmp_path):
    tree = _fake_tree(tmp_path)
    h = tmp_path / "vmlinux.h"
    h.write_text("struct other {\n\tint x;\n};\n\nstruct sched_ext_ops {\n"
                 "\tvoid (*enqueue)(void);\n\tu64 hotplug_seq;\n};\n")
    said = []
    scxbuild._complete_ops(h, tree, said.append)
    text = h.read_text()
    body = text.split("struct sched_ext_ops {")[1].split("};")[0]
    assert "void (*cgroup_set_idle)(void);" in body and body.count("hotplug_seq") == 1
    assert "cgroup_set_idle" in said[0]
    scxbuild._complete_ops(h, tree, said.append)  # idempotent
    assert h.read_text() == text and len(said) == 1


def test_unknown_scheduler_and_missing_source_refused(tmp_path, monkeypatch):
    class Art:
        name = "fake"
        vmlinux = tmp_path / "vmlinux"

    with pytest.raises(scxbuild.ScxBuildError, match="no source tree with tools/sched_ext"):
        scxbuild.kernel_source(Art())


@pytest.mark.slow
def test_build_scx_simple_for_the_store_kernel():
    from vmm import kernelstore as ks

    wanted = f"build-{ks.DEFAULT_BUILD_VERSION}-{ks.fragment_hash(ks.DEFAULT_FRAGMENT)}"
    if not any(a.name == wanted for a in ks.list_kernels()):
        pytest.skip(f"kernel {wanted} is not built: run `make kernel-build` (CI does)")
    try:
        sched = scxbuild.build_scheduler("simple", f"build:{ks.DEFAULT_BUILD_VERSION}",
                                         progress=None)
    except scxbuild.ScxBuildError as exc:
        if "apt-get install" in str(exc):
            pytest.skip(str(exc))
        raise
    assert sched.binary.exists() and os.access(sched.binary, os.X_OK)
    again = scxbuild.build_scheduler("simple", f"build:{ks.DEFAULT_BUILD_VERSION}", progress=None)
    assert again.cached and again.binary == sched.binary
    with pytest.raises(scxbuild.ScxBuildError, match="expected one of"):
        scxbuild.build_scheduler("nonesuch", f"build:{ks.DEFAULT_BUILD_VERSION}", progress=None)
