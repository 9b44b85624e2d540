"""Finding a kernel's files where a kernel developer keeps them.

A developer points at one thing: a build tree (``~/linux``: ``vmlinux`` at the top,
``arch/x86/boot/bzImage``), a directory holding a bzImage and a vmlinux, one image file,
or a distro kernel (``/boot/vmlinuz-VER`` with ``/boot/System.map-VER``,
``/boot/config-VER`` and a debug vmlinux under ``/usr/lib/debug``).  ``locate()`` turns
that into the file to boot plus the files that hold the symbols, the BTF types and the
kernel config, and says where each came from.

Where the symbols of a bzImage are looked for, in order: a ``vmlinux`` beside the image
(or at the top of the build tree the image sits in) with a ``.symtab``; a
``System.map`` there; the debug vmlinux with the same build id under
``/usr/lib/debug/.build-id/``; for ``/boot/vmlinuz-VER``, ``/usr/lib/debug/boot/vmlinux-VER``,
``/usr/lib/debug/lib/modules/VER/vmlinux`` and ``/boot/System.map-VER``.  A vmlinux
whose build id differs from the image's is skipped (a stale file from another build).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from vmm.errors import ImageError, KernelFeatureMissing, KernelStoreError
from vmm.image.formats import extract_vmlinux  # the one decompressor
from vmm.kernel.elf import ElfImage

DEBUG_ROOT = Path("/usr/lib/debug")
BOOT_DIR = Path("/boot")

PathLike = str | os.PathLike


@dataclass
class KernelFiles:
    """The files of one kernel, each None when it was not found."""

    boot: Path                        # the image to boot (as given, or the tree's)
    bzimage: Optional[Path] = None
    vmlinux: Optional[Path] = None    # an ELF vmlinux (may lack .symtab: then system_map)
    system_map: Optional[Path] = None
    config: Optional[Path] = None
    tree: Optional[Path] = None       # the kernel build tree, when there is one
    notes: list[str] = field(default_factory=list)  # where each file came from

    @property
    def symbols_from(self) -> Optional[Path]:
        """The file the symbols come from: a vmlinux with .symtab, else System.map."""
        if self.vmlinux is not None and has_symtab(self.vmlinux):
            return self.vmlinux
        return self.system_map

    @property
    def types_from(self) -> Path:
        """The file the BTF comes from: the vmlinux, else the image's own payload."""
        return self.vmlinux or self.bzimage or self.boot

    def describe(self) -> str:
        """Which files the symbols and the types come from, in words."""
        sym = self.symbols_from
        return (f"symbols from {sym if sym else 'nowhere (no .symtab, no System.map)'}, "
                f"types from {self.types_from}")

    def load(self):
        """vmm.kernel.Kernel from these files (symbols and BTF as described)."""
        from vmm.kernel.shared import load_shared  # one parse per unchanged files

        if self.vmlinux is not None:
            return load_shared(vmlinux=self.vmlinux, system_map=self.system_map)
        if is_elf(self.boot):
            return load_shared(vmlinux=self.boot, system_map=self.system_map)
        return load_shared(bzimage=self.boot, system_map=self.system_map)


def no_symbols_message(path: PathLike, what: str = "this kernel") -> str:
    """The refusal for a symbol lookup in a file without a symbol table."""
    return (f"{os.fspath(path)} has no symbol table (no .symtab: a stripped vmlinux or a "
            f"vmlinux decompressed from a bzImage) and no System.map was found beside it: "
            f"pass --system-map FILE (the build's System.map) or --vmlinux FILE (the unstripped "
            f"vmlinux of {what})")


def is_elf(path: PathLike) -> bool:
    """True when the file starts with the ELF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def is_bzimage(path: PathLike) -> bool:
    """True when the file has the boot protocol's 'HdrS' header magic."""
    try:
        with open(path, "rb") as f:
            f.seek(0x202)
            return f.read(4) == b"HdrS"  # boot protocol header magic
    except OSError:
        return False


def has_symtab(path: PathLike) -> bool:
    """True when the file is an ELF with a .symtab section."""
    try:
        elf = ElfImage(path)
    except (ImageError, OSError):
        return False
    try:
        return elf.section(".symtab") is not None
    finally:
        elf.close()


def build_id(path: PathLike) -> Optional[str]:
    """GNU build id of an ELF vmlinux, or of the vmlinux inside a bzImage."""
    try:
        if is_elf(path):
            elf = ElfImage(path)
        elif is_bzimage(path):
            elf = ElfImage(extract_vmlinux(Path(path).read_bytes()))
        else:
            return None
    except (ImageError, OSError):
        return None
    try:
        return elf.build_id()
    finally:
        elf.close()


def is_build_tree(d: PathLike) -> bool:
    """A Linux source/build tree: Kbuild's top-level files, or a built vmlinux next to
    arch/x86/boot/bzImage."""
    d = Path(d)
    return ((d / "Kbuild").is_file() and (d / "Kconfig").is_file()) or \
        ((d / "vmlinux").is_file() and (d / "arch/x86/boot/bzImage").is_file())


def find_build_tree(start: PathLike) -> Optional[Path]:
    """The build tree ``start`` is in (itself or a parent), or None."""
    d = Path(start).resolve()
    for cand in (d, *d.parents):
        if is_build_tree(cand):
            return cand
    return None


def _first(d: Path, *patterns: str) -> Optional[Path]:
    for pat in patterns:
        for p in sorted(d.glob(pat)):
            if p.is_file():
                return p
    return None


def _tree_of_image(image: Path) -> Optional[Path]:
    """``<tree>/arch/x86/boot/bzImage`` -> ``<tree>`` when that is a build tree."""
    parts = image.resolve().parts
    if len(parts) >= 4 and parts[-4:-1] == ("arch", "x86", "boot"):
        tree = Path(*parts[:-4])
        if is_build_tree(tree):
            return tree
    return None


# What locate() found, per call, while the files it looked at are unchanged: a clone
# restored from a snapshot locates its kernel again, and each look opens several files
# (~3 ms each over the SVM lane's 9p share; a clone's restore is ~90 ms there).
_FOUND: dict[tuple, tuple[tuple, KernelFiles]] = {}
_FOUND_KEEP = 8
_FILE_FIELDS = ("boot", "bzimage", "vmlinux", "system_map", "config")


def _stamps(paths) -> tuple:
    """(inode, size, mtime) of each path; None for one that is gone."""
    out = []
    for f in paths:
        try:
            st = os.stat(f)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


def _found_paths(p: Path, files: KernelFiles) -> list:
    # The directory holding an image too: a vmlinux or System.map put beside it later
    # changes the directory's mtime, and is found then.
    return [p, p.parent] + [getattr(files, f) for f in _FILE_FIELDS if getattr(files, f) is not None]


def locate(path: PathLike, *, vmlinux: Optional[PathLike] = None,
           system_map: Optional[PathLike] = None, debug_root: PathLike = DEBUG_ROOT,
           boot_dir: PathLike = BOOT_DIR, search: bool = True) -> KernelFiles:
    """The files of the kernel at ``path`` (an image file or a directory); explicit
    ``vmlinux`` / ``system_map`` win over anything found. ``search=False`` skips the
    search for an unstripped vmlinux matching an image file (the image's System.map and
    config are still found): what booting needs, without the build-id comparison.
    A second call with the same arguments, while ``path`` and every file found are
    unchanged (inode, size, mtime), answers from memory."""
    p = Path(path).expanduser()
    key = (os.path.abspath(p), vmlinux, system_map, os.fspath(debug_root), os.fspath(boot_dir),
           search)
    hit = _FOUND.get(key)
    if hit is not None and hit[0] == _stamps(_found_paths(p, hit[1])):
        return replace(hit[1], notes=list(hit[1].notes))
    files = _locate(p, path, vmlinux, system_map, debug_root, boot_dir, search)
    _FOUND.pop(key, None)
    while len(_FOUND) >= _FOUND_KEEP:
        _FOUND.pop(next(iter(_FOUND)))
    _FOUND[key] = (_stamps(_found_paths(p, files)), replace(files, notes=list(files.notes)))
    return files


def _locate(p: Path, path: PathLike, vmlinux, system_map, debug_root, boot_dir,
            search: bool) -> KernelFiles:
    if not p.exists():
        raise KernelStoreError(f"kernel {os.fspath(path)!r}: no such file or directory")
    if p.is_dir():
        files = _from_dir(p)
    else:
        # A vmlinux given explicitly ends the search for one (which would decompress the
        # image to compare build ids: seconds on a slow host, before every boot).
        files = _from_file(p, Path(debug_root), Path(boot_dir), search=search and vmlinux is None)
    if vmlinux is not None:
        files.vmlinux = Path(vmlinux)
        files.notes.append(f"vmlinux {vmlinux} (given)")
    if system_map is not None:
        files.system_map = Path(system_map)
        files.notes.append(f"System.map {system_map} (given)")
    for what in ("vmlinux", "system_map"):
        f = getattr(files, what)
        if f is not None and not f.is_file():
            raise KernelStoreError(f"{what.replace('_', '.')} {f}: no such file")
    return files


def _from_dir(d: Path) -> KernelFiles:
    if is_build_tree(d):
        bz = d / "arch/x86/boot/bzImage"
        vml = d / "vmlinux"
        if not vml.is_file() and not bz.is_file():
            raise KernelStoreError(f"{d} is a kernel source tree but holds no built kernel "
                                   f"(no vmlinux, no arch/x86/boot/bzImage): run make there first")
        files = KernelFiles(boot=vml if vml.is_file() else bz, tree=d,
                            bzimage=bz if bz.is_file() else None,
                            vmlinux=vml if vml.is_file() else None,
                            system_map=_first(d, "System.map"), config=_first(d, ".config"))
        files.notes.append(f"kernel build tree {d}")
        return files
    bz = _first(d, "bzImage", "arch/x86/boot/bzImage", "vmlinuz", "vmlinuz-*")
    vml = _first(d, "vmlinux", "vmlinux-*")
    if vml is not None and not is_elf(vml):
        vml = None
    if bz is None and vml is None:
        raise KernelStoreError(f"directory {d} holds no bzImage, vmlinuz or vmlinux "
                               f"(nor is it a kernel build tree)")
    files = KernelFiles(boot=vml or bz, bzimage=bz, vmlinux=vml,
                        system_map=_first(d, "System.map", "System.map-*"),
                        config=_first(d, "config", ".config", "config-*"))
    files.notes.append(f"directory {d}")
    return files


def _from_file(image: Path, debug_root: Path, boot_dir: Path, search: bool = True) -> KernelFiles:
    if is_elf(image):
        files = KernelFiles(boot=image, vmlinux=image)
    elif is_bzimage(image):
        files = KernelFiles(boot=image, bzimage=image)
    else:
        raise ImageError(f"{image}: neither an ELF vmlinux nor a bzImage (no HdrS at 0x202)")
    beside = image.parent
    tree = _tree_of_image(image)
    files.tree = tree
    places = [beside] + ([tree] if tree is not None else [])
    release = image.name.split("-", 1)[1] if image.name.startswith(("vmlinuz-", "vmlinux-")) \
        else None
    if search and (files.vmlinux is None or not has_symtab(files.vmlinux)):
        image_id = None
        candidates: list[tuple[Path, str]] = []
        for d in places:
            for name in ("vmlinux",) + ((f"vmlinux-{release}",) if release else ()):
                c = d / name
                if c.is_file() and c.resolve() != image.resolve():
                    candidates.append((c, "beside the image" if d == beside else "in the build tree"))
        image_id = build_id(image)
        if image_id:
            candidates.append((debug_root / ".build-id" / image_id[:2] / f"{image_id[2:]}.debug",
                               "by build id"))
        if release:
            candidates += [(debug_root / "boot" / f"vmlinux-{release}", "debug package"),
                           (debug_root / "lib/modules" / release / "vmlinux", "debug package")]
        for c, why in candidates:
            if not c.is_file() or not is_elf(c) or not has_symtab(c):
                continue
            cid = build_id(c)
            if image_id and cid and cid != image_id:
                files.notes.append(f"skipped {c}: build id {cid[:12]} is not the image's "
                                   f"{image_id[:12]} (a stale build?)")
                continue
            files.vmlinux = c
            files.notes.append(f"vmlinux {c} ({why})")
            break
    map_names = ("System.map",) + ((f"System.map-{release}",) if release else ())
    map_dirs = places + ([boot_dir] if release else [])
    for d in map_dirs:
        hit = next((d / n for n in map_names if (d / n).is_file()), None)
        if hit is not None and _real_system_map(hit):
            files.system_map = hit
            files.notes.append(f"System.map {hit}")
            break
    cfg_names = (".config", "config") + ((f"config-{release}",) if release else ())
    for d in map_dirs:
        hit = next((d / n for n in cfg_names if (d / n).is_file()), None)
        if hit is not None:
            files.config = hit
            break
    return files


def _real_system_map(path: Path) -> bool:
    """Debian ships a one-line placeholder System.map in its image package."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return b"The real System.map" not in head


def require_symbols(kernel, files_or_path) -> None:
    """KernelFeatureMissing naming the file when ``kernel`` has no symbol table."""
    if len(kernel.symbols) == 0:
        where = files_or_path.types_from if isinstance(files_or_path, KernelFiles) \
            else files_or_path
        raise KernelFeatureMissing(no_symbols_message(where))
