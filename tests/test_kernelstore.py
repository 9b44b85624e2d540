"""The kernel store: specs, paths, manifests, config checks, private apt (no downloads)."""

import json
from pathlib import Path

import pytest

from vmm import kernelstore as ks
from vmm.errors import ImageError, KernelStoreError
from vmm.kvm.pvm import is_pvm_host


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path))
    return tmp_path / "kernels"


def fake_bzimage(path: Path) -> Path:
    data = bytearray(0x400)
    data[0x202:0x206] = b"HdrS"
    path.write_bytes(bytes(data))
    return path


def fake_elf(path: Path) -> Path:
    path.write_bytes(b"\x7fELF" + b"\0" * 60)
    return path


def test_cache_root_honours_env(store):
    assert ks.cache_root() == store


def test_cache_root_default(monkeypatch):
    monkeypatch.delenv("VMM_CACHE_DIR", raising=False)
    assert ks.cache_root() == Path.home() / ".cache" / "vmm" / "kernels"


def test_parse_config_and_mismatches():
    text = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=64\nCONFIG_S=\"x y\"\n# comment\n"
    cfg = ks.parse_config(text)
    assert cfg == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": "64", "CONFIG_S": '"x y"'}
    frag = ks.parse_config("CONFIG_A=y\nCONFIG_B=n\nCONFIG_C=32\nCONFIG_D=y\n# CONFIG_E is not set\n")
    bad = ks.config_mismatches(frag, cfg)
    assert bad == ["CONFIG_C: asked 32, got 64", "CONFIG_D: asked y, got n"]


def test_committed_fragment_has_the_sched_ext_essentials():
    frag = ks.parse_config(ks.DEFAULT_FRAGMENT.read_text())
    for key in ("CONFIG_SCHED_CLASS_EXT", "CONFIG_DEBUG_INFO_BTF", "CONFIG_BPF_SYSCALL", "CONFIG_SMP",
                "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_BLK_DEV_INITRD", "CONFIG_PVH", "CONFIG_KALLSYMS_ALL"):
        assert frag[key] == "y", key
    for key in KASLR_OPTIONS:  # our users' kernels randomize: so does ours
        assert frag[key] == "y", key


KASLR_OPTIONS = ("CONFIG_RELOCATABLE", "CONFIG_RANDOMIZE_BASE", "CONFIG_RANDOMIZE_MEMORY")


def test_built_kernel_config_kept_kaslr():
    """olddefconfig kept the KASLR options of the fragment (checked on the built .config)."""
    wanted = f"build-{ks.DEFAULT_BUILD_VERSION}-{ks.fragment_hash(ks.DEFAULT_FRAGMENT)}"
    art = next((a for a in ks.list_kernels() if a.name == wanted), None)
    if art is None or art.config is None:
        pytest.skip(f"kernel {wanted} is not built: run `make kernel-build`")
    config = ks.parse_config(art.config.read_text())
    assert [k for k in KASLR_OPTIONS if config.get(k) != "y"] == []


def test_fragment_hash_is_stable_and_content_based(tmp_path):
    a = tmp_path / "a"
    a.write_text("CONFIG_X=y\n")
    h = ks.fragment_hash(a)
    assert len(h) == 12 and h == ks.fragment_hash(a)
    a.write_text("CONFIG_X=n\n")
    assert ks.fragment_hash(a) != h
    with pytest.raises(KernelStoreError, match="cannot read"):
        ks.fragment_hash(tmp_path / "missing")


def test_version_ordering():
    versions = ["7.3.10+deb13", "7.3.4+deb13", "7.10.1+deb13", "6.12.117"]
    assert max(versions, key=ks._version_key) == "7.10.1+deb13"
    assert sorted(["7.3.4", "7.3.10", "7.3.9"], key=ks._version_key) == ["7.3.4", "7.3.9", "7.3.10"]


def test_resolve_path_to_files_and_directories(tmp_path):
    bz = fake_bzimage(tmp_path / "bzImage")
    (tmp_path / "System.map").write_text("ffffffff81000000 T _text\n")
    (tmp_path / "config").write_text("CONFIG_X=y\n")
    art = ks.resolve_kernel(str(bz))
    assert art.bzimage == bz and art.vmlinux is None
    assert art.system_map == tmp_path / "System.map" and art.config == tmp_path / "config"
    assert art.boot_image == bz
    vm = fake_elf(tmp_path / "vmlinux")
    art = ks.resolve_kernel(tmp_path)
    assert art.vmlinux == vm and art.bzimage == bz
    # PVM hosts boot the ELF (no emulated decompressor); hardware virtualization the
    # bzImage, which relocates and randomizes itself.
    assert art.boot_image_for(False) == vm and art.boot_image_for(True) == bz
    assert art.boot_image == (vm if is_pvm_host() else bz)
    only_elf = ks.KernelArtifacts("x", "1", None, vm, None, None)
    assert only_elf.boot_image_for(True) == vm  # falls back to what there is
    assert ks.resolve_kernel(vm).vmlinux == vm


def test_resolve_kernel_build_tree_layout(tmp_path):
    (tmp_path / "arch" / "x86" / "boot").mkdir(parents=True)
    bz = fake_bzimage(tmp_path / "arch" / "x86" / "boot" / "bzImage")
    (tmp_path / ".config").write_text("CONFIG_X=y\n")
    art = ks.resolve_kernel(tmp_path)
    assert art.bzimage == bz and art.config == tmp_path / ".config"


@pytest.mark.parametrize("spec", ["nonsense", "debian:1", "buildx"])
def test_bad_specs(spec):
    with pytest.raises(KernelStoreError, match="expected"):
        ks.resolve_kernel(spec)


def test_bad_paths(tmp_path):
    with pytest.raises(KernelStoreError, match="no such file"):
        ks.resolve_kernel(str(tmp_path / "nope"))
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a kernel" * 100)
    with pytest.raises(ImageError, match="neither"):
        ks.resolve_kernel(str(junk))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KernelStoreError, match="holds no"):
        ks.resolve_kernel(empty)


def test_bad_build_version(store):
    with pytest.raises(KernelStoreError, match="MAJOR.MINOR"):
        ks.build_kernel("latest")


def _cached_entry(store: Path, kind: str, name: str, version: str) -> ks.KernelArtifacts:
    d = store / kind / name
    d.mkdir(parents=True)
    art = ks.KernelArtifacts(
        name=f"{kind}-{name}", version=version, bzimage=fake_bzimage(d / "bzImage"),
        vmlinux=fake_elf(d / "vmlinux"), system_map=None, config=None,
    )  # fmt: skip
    ks._write_manifest(d, art, source=kind)
    return art


def test_manifest_round_trip_and_list(store):
    a = _cached_entry(store, "build", "7.3-aaaaaaaaaaaa", "7.3.4")
    b = _cached_entry(store, "build", "6.12-bbbbbbbbbbbb", "6.12.117")
    c = _cached_entry(store, "debian", "7.3.4+deb13-cloud-amd64", "7.3.4")
    assert ks.list_kernels() == [c, a, b]
    assert ks.resolve_kernel(str(store / "build" / "7.3-aaaaaaaaaaaa")) == a
    assert json.loads((store / "build" / "7.3-aaaaaaaaaaaa" / "manifest.json").read_text())["source"] == "build"
    assert ks.resolve_kernel("debian") == c  # cached: no network


def test_build_kernel_returns_cached_entry(store):
    name = f"7.3-{ks.fragment_hash(ks.DEFAULT_FRAGMENT)}"
    art = _cached_entry(store, "build", name, "7.3.4")
    assert ks.build_kernel("7.3") == art
    assert ks.resolve_kernel("build") == art
    assert ks.resolve_kernel("build:7.3") == art


def test_manifest_with_missing_files_is_not_cached(store):
    art = _cached_entry(store, "build", "7.3-cccccccccccc", "7.3.4")
    art.vmlinux.unlink()
    assert ks.list_kernels() == []
    (store / "build" / "7.3-cccccccccccc" / "manifest.json").write_text("{broken")
    assert ks.list_kernels() == []


def test_placeholder_system_map(tmp_path):
    p = tmp_path / "System.map"
    p.write_text("ffffffffffffffff B The real System.map is in the linux-image-7.3.4+deb13-cloud-amd64-dbg package\n")
    assert ks._is_placeholder_system_map(p)
    p.write_text("".join(f"ffffffff81{i:06x} T sym{i}\n" for i in range(1000)))
    assert not ks._is_placeholder_system_map(p)


def test_configured_mirror_reads_the_system_sources():
    uri, keyring = ks._configured_mirror()
    assert uri.startswith("http") and keyring.startswith("/")


def test_private_apt_sources_list(store):
    apt = ks.PrivateApt(store, progress=lambda line: None)
    apt._setup()
    text = (store / "apt" / "sources.list").read_text()
    assert "trixie-backports main" in text and "trixie main" in text and "signed-by=" in text
    options = " ".join(apt._options())
    assert "Dir::Etc::SourceParts=/dev/null" in options and str(store) in options


def test_deb_member_extraction(tmp_path):
    """A .deb built with dpkg-deb, streamed back through our extractor."""
    import shutil
    import subprocess

    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not installed")
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: t\nVersion: 1\nArchitecture: all\nMaintainer: x <x@y>\nDescription: t\n"
    )
    (root / "usr" / "lib" / "modules" / "1.0").mkdir(parents=True)
    (root / "usr" / "lib" / "modules" / "1.0" / "vmlinuz").write_bytes(b"KERNEL" * 1000)
    (root / "usr" / "lib" / "modules" / "1.0" / "config").write_text("CONFIG_X=y\n")
    deb = tmp_path / "t.deb"
    subprocess.run(["dpkg-deb", "--build", "-Zgzip", str(root), str(deb)], check=True, capture_output=True)
    out = tmp_path / "out"
    found = ks._deb_members(deb, lambda n: n.rsplit("/", 1)[-1] if n.endswith(("vmlinuz", "config")) else None, out)
    assert found["vmlinuz"].read_bytes() == b"KERNEL" * 1000
    assert found["config"].read_text() == "CONFIG_X=y\n"


def test_cli_list_and_path(store, capsys, tmp_path):
    from vmm.cli_kernelstore import main  # what `python -m vmm.kernelstore` runs

    art = _cached_entry(store, "build", "7.3-dddddddddddd", "7.3.4")
    assert main(["list"]) == 0
    assert "build-7.3-dddddddddddd" in capsys.readouterr().out
    assert main(["path", str(art.vmlinux.parent)]) == 0
    assert capsys.readouterr().out.strip() == str(art.vmlinux)
    assert main(["path", "nonsense"]) == 1
    assert "error:" in capsys.readouterr().err
    assert main(["path", "--field", "system_map", str(art.vmlinux.parent)]) == 1


def test_artifacts_without_image():
    art = ks.KernelArtifacts("x", "1", None, None, None, None)
    with pytest.raises(KernelStoreError, match="neither"):
        art.boot_image


@pytest.mark.slow
def test_fetch_debian_real(tmp_path, monkeypatch):
    """Downloads ~15 MB from the Debian mirror into a private store."""
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path))
    try:
        art = ks.fetch_debian(progress=lambda line: None)
    except KernelStoreError as e:
        if "Could not resolve" in str(e) or "Failed to fetch" in str(e) or "Temporary failure" in str(e):
            pytest.skip(f"Debian mirror not reachable: {e}")
        raise
    assert art.bzimage.exists() and art.config.exists()
    assert "CONFIG_SCHED_CLASS_EXT=y" in art.config.read_text()
    with open(art.bzimage, "rb") as f:
        f.seek(0x202)
        assert f.read(4) == b"HdrS"
    manifest = json.loads((art.bzimage.parent / "manifest.json").read_text())
    assert all(len(p["sha256"]) == 64 for p in manifest["packages"])
    assert art.system_map is None  # the placeholder is not reported as a System.map
    assert ks.fetch_debian(progress=lambda line: None) == art  # cached



def test_prune_keeps_artifacts(store):
    art = _cached_entry(store, "build", "7.3-eeeeeeeeeeee", "7.3.4")
    src = store / "build" / "7.3-eeeeeeeeeeee" / "src" / "linux-source-7.3"
    src.mkdir(parents=True)
    (src / "Makefile").write_text("x")
    unfinished = store / "build" / "6.12-ffffffffffff" / "src"
    unfinished.mkdir(parents=True)  # no manifest: a build in progress, left alone
    assert ks.prune_sources() == 1
    assert not src.exists() and unfinished.exists()
    assert ks.list_kernels() == [art]


def test_store_lock_serialises_fetches_and_builds(store):
    import threading

    messages, order = [], []

    def second():
        with ks._store_lock(messages.append):
            order.append("second")

    with ks._store_lock(lambda line: None):
        t = threading.Thread(target=second)
        t.start()
        t.join(0.3)
        assert t.is_alive() and order == []  # waiting for us
        order.append("first")
    t.join(5)
    assert order == ["first", "second"]
    assert "busy" in messages[0]
    # a cached kernel is returned without taking the lock
    name = f"7.3-{ks.fragment_hash(ks.DEFAULT_FRAGMENT)}"
    art = _cached_entry(store, "build", name, "7.3.4")
    with ks._store_lock(lambda line: None):
        assert ks.build_kernel("7.3") == art
