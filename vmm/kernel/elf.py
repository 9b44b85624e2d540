"""The parts of a vmlinux ELF that introspection needs: sections, symbols, build id, .BTF.

pyelftools reads the headers and section table. The symbol table itself (~160k
entries in a distro vmlinux) is unpacked in bulk with struct.iter_unpack: pyelftools'
per-symbol objects would cost seconds.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

from vmm.errors import ImageError
from vmm.kernel.symbols import Symbol

PERCPU_SECTION = ".data..percpu"

SHN_UNDEF, SHN_ABS, SHN_COMMON, SHN_XINDEX = 0, 0xFFF1, 0xFFF2, 0xFFFF
STT_SECTION, STT_FILE = 3, 4
STB_LOCAL, STB_GLOBAL, STB_WEAK = 0, 1, 2
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 1, 2, 4
SHT_NOBITS = 8
ELF64_SYM = struct.Struct("<IBBHQQ")


@dataclass(frozen=True)
class Section:
    """One ELF section header, with its name resolved."""

    index: int
    name: str
    addr: int
    offset: int
    size: int
    type: int
    flags: int
    link: int = 0


def _elftools():
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    return ELFFile, ELFError


class ElfImage:
    """A vmlinux (or any x86-64 ELF) opened for introspection.

    `source` is a path or the file's bytes. Every failure on corrupt input is an
    ImageError naming what was wrong.
    """

    def __init__(self, source: str | os.PathLike | bytes):
        # No file descriptor stays open between calls: a Kernel lives as long as a
        # session and must not leak one; reads reopen the file (cheap next to parsing).
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.path = None
            self._data: bytes | None = bytes(source)
        else:
            self.path = os.fspath(source)
            self._data = None
        with self._open() as fh:
            fh.seek(0, io.SEEK_END)
            self.file_size = fh.tell()
            fh.seek(0)
            magic = fh.read(4)
            if magic != b"\x7fELF":
                raise ImageError(f"{self._what()} is not an ELF file (magic {magic!r})")
            ELFFile, ELFError = _elftools()
            try:
                elf = ELFFile(fh)
                if elf.elfclass != 64 or not elf.little_endian:
                    raise ImageError(f"{self._what()} is not a little-endian ELF64 file")
                self.sections = [self._section(i, s) for i, s in enumerate(elf.iter_sections())]
            except ImageError:
                raise
            except (ELFError, Exception) as e:  # pyelftools raises assorted errors on garbage
                raise ImageError(f"{self._what()}: corrupt ELF headers: {type(e).__name__}: {e}") from None
        self._by_name = {}
        for s in self.sections:
            self._by_name.setdefault(s.name, s)

    def _open(self) -> BinaryIO:
        if self._data is not None:
            return io.BytesIO(self._data)
        try:
            return open(self.path, "rb")
        except OSError as e:
            raise ImageError(f"cannot open ELF {self.path}: {e.strerror}") from None

    def _what(self) -> str:
        return self.path or "ELF image"

    def _section(self, index: int, s) -> Section:
        h = s.header
        sec = Section(index, s.name, h.sh_addr, h.sh_offset, h.sh_size, _sh_type(h.sh_type),
                      h.sh_flags, h.sh_link)
        if sec.type != SHT_NOBITS and sec.offset + sec.size > self.file_size:
            raise ImageError(f"{self._what()}: section {sec.name!r} [{sec.offset:#x}, +{sec.size:#x}) "
                             f"runs past the end of the file ({self.file_size:#x} bytes)")
        return sec

    def close(self) -> None:
        """Nothing to release (kept for callers that close what they open)."""

    def section(self, name: str) -> Section | None:
        """The section named `name`, or None."""
        return self._by_name.get(name)

    def section_data(self, sec: Section) -> bytes:
        """A section's bytes (b'' for SHT_NOBITS)."""
        if sec.type == SHT_NOBITS:
            return b""
        with self._open() as fh:
            fh.seek(sec.offset)
            data = fh.read(sec.size)
        if len(data) != sec.size:
            raise ImageError(f"{self._what()}: section {sec.name!r} truncated")
        return data

    # ------------------------------------------------------------ contents
    def btf(self) -> bytes | None:
        """The .BTF section's bytes, or None."""
        sec = self.section(".BTF")
        return self.section_data(sec) if sec else None

    def build_id(self) -> str | None:
        """Hex GNU build id from .note.gnu.build-id (or any note section), else None."""
        candidates = [s for s in self.sections if s.name == ".note.gnu.build-id"]
        candidates += [s for s in self.sections if s.type == 7 and s not in candidates]  # SHT_NOTE
        for sec in candidates:
            bid = _parse_build_id(self.section_data(sec))
            if bid:
                return bid
        return None

    def content_hash(self) -> str:
        """sha256 of the file, the cache key when there is no build id."""
        h = hashlib.sha256()
        with self._open() as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return "sha256-" + h.hexdigest()[:40]

    def read_va(self, va: int, n: int) -> bytes | None:
        """n bytes of the file's contents at link-time virtual address va, if there."""
        for s in self.sections:
            if s.flags & SHF_ALLOC and s.type != SHT_NOBITS and s.addr <= va and va + n <= s.addr + s.size:
                with self._open() as fh:
                    fh.seek(s.offset + va - s.addr)
                    return fh.read(n)
        return None

    def symbols(self) -> list[Symbol]:
        """Every named symbol of .symtab (files and sections left out), [] if none."""
        symtab = self.section(".symtab")
        if symtab is None:
            return []
        link = symtab.link
        if not 0 <= link < len(self.sections):
            raise ImageError(f"{self._what()}: .symtab links to missing string table {link}")
        strtab = self.section_data(self.sections[link])
        data = self.section_data(symtab)
        usable = len(data) - len(data) % ELF64_SYM.size
        secs = self.sections
        percpu = self.section(PERCPU_SECTION)
        out: list[Symbol] = []
        for st_name, info, _other, shndx, value, size in ELF64_SYM.iter_unpack(data[:usable]):
            stype, bind = info & 0xF, info >> 4
            if stype in (STT_SECTION, STT_FILE) or st_name == 0 or shndx == SHN_UNDEF:
                continue
            if st_name >= len(strtab):
                raise ImageError(f"{self._what()}: symbol name offset {st_name} outside the string table")
            end = strtab.find(b"\0", st_name)
            name = strtab[st_name:end if end >= 0 else len(strtab)].decode("utf-8", "replace")
            if shndx == SHN_ABS:
                sec_name, letter = "*ABS*", "a"
            elif shndx < len(secs) and shndx not in (SHN_COMMON, SHN_XINDEX):
                sec = secs[shndx]
                sec_name, letter = sec.name, _nm_letter(sec)
            else:
                sec_name, letter = "", "?"
            if bind == STB_WEAK:
                letter = "W" if letter != "?" else "w"
            elif bind != STB_LOCAL:
                letter = letter.upper()
            # A linker-script symbol can carry the per-CPU section index without being
            # a per-CPU variable (__per_cpu_load is the template's load address).
            is_percpu = (percpu is not None and sec_name == PERCPU_SECTION
                         and percpu.addr <= value <= percpu.addr + percpu.size
                         and name != "__per_cpu_load")
            out.append(Symbol(name, value, size, letter, sec_name, is_percpu))
        return out

    def percpu_section(self) -> Section | None:
        """The .data..percpu section, or None."""
        return self.section(PERCPU_SECTION)


def _sh_type(t) -> int:
    if isinstance(t, int):
        return t
    return {"SHT_NOBITS": SHT_NOBITS, "SHT_NOTE": 7, "SHT_PROGBITS": 1, "SHT_SYMTAB": 2,
            "SHT_STRTAB": 3}.get(t, -1)


def _nm_letter(sec: Section) -> str:
    """nm's lower-case letter for a symbol defined in `sec`."""
    if sec.type == SHT_NOBITS:
        return "b"
    if sec.flags & SHF_EXECINSTR:
        return "t"
    if sec.flags & SHF_WRITE:
        return "d"
    if sec.flags & SHF_ALLOC:
        return "r"
    return "n"


def _parse_build_id(notes: bytes) -> str | None:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
        name_end = pos + 12 + ((namesz + 3) & ~3)
        desc_end = name_end + ((descsz + 3) & ~3)
        if desc_end > len(notes) or namesz > len(notes) or descsz > len(notes):
            return None
        name = notes[pos + 12:pos + 12 + namesz].rstrip(b"\0")
        if ntype == 3 and name == b"GNU" and descsz:
            return notes[name_end:name_end + descsz].hex()
        pos = desc_end
    return None
