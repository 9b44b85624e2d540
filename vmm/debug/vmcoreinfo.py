"""VMCOREINFO built from our introspection of a running guest.

The kernel's own kdump path writes a text note, ``KEY=value`` lines, that tells dump
readers (drgn, crash, makedumpfile) where the kernel lies: its release, page size,
KASLR offset, phys_base, the root page table, and sizes/offsets of the structures
they walk. A guest kernel built without CONFIG_VMCORE_INFO has none; even with it the
note is only filled in at boot. We know the same facts from the vmlinux (symbols, BTF)
and the live guest (slide, phys_base, paging mode, memory), so we write the note
ourselves, in the kernel's own formats (kernel/vmcore_info.c, printk.c,
arch/x86/kernel/vmcore_info_64.c):

    OSRELEASE=%s  BUILD-ID=<hex>  PAGESIZE=%ld  SYMBOL(x)=%lx  SIZE(x)=%lu
    OFFSET(s.f)=%lu  LENGTH(x)=%lu  NUMBER(x)=%ld  KERNELOFFSET=%lx  CRASHTIME=%lld

Every entry the kernel writes that this kernel's symbols/BTF cannot give is listed in
``VmcoreInfo.skipped`` with the reason, never dropped silently.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from vmm.errors import ImageError, VmmError

PAGE_SIZE = 4096
START_KERNEL_MAP = 0xFFFFFFFF80000000
SECTION_SIZE_BITS = 27  # x86-64 (arch/x86/include/asm/sparsemem.h)
KERNEL_IMAGE_SIZE_KASLR = 1 << 30
KERNEL_IMAGE_SIZE = 512 << 20
VMALLOC_START_4L = 0xFFFFC90000000000
VMALLOC_START_5L = 0xFFA0000000000000
VMEMMAP_START_4L = 0xFFFFEA0000000000
VMEMMAP_START_5L = 0xFFD4000000000000

# (struct, field) pairs whose OFFSET() the kernel writes; fields renamed across
# versions are alternatives separated by "|" (the first BTF has is written).
STRUCT_OFFSETS = [
    ("uts_namespace", "name"),
    ("mem_section", "section_mem_map"),
    ("page", "flags"), ("page", "_refcount"), ("page", "mapping"), ("page", "lru"),
    ("page", "_mapcount"), ("page", "private"), ("page", "compound_info|compound_head"),
    ("pglist_data", "node_zones"), ("pglist_data", "nr_zones"),
    ("pglist_data", "node_mem_map"), ("pglist_data", "node_start_pfn"),
    ("pglist_data", "node_spanned_pages"), ("pglist_data", "node_id"),
    ("zone", "free_area"), ("zone", "vm_stat"), ("zone", "spanned_pages"),
    ("free_area", "free_list"), ("list_head", "next"), ("list_head", "prev"),
    ("printk_ringbuffer", "desc_ring"), ("printk_ringbuffer", "text_data_ring"),
    ("printk_ringbuffer", "fail"),
    ("prb_desc_ring", "count_bits"), ("prb_desc_ring", "descs"), ("prb_desc_ring", "infos"),
    ("prb_desc_ring", "head_id"), ("prb_desc_ring", "tail_id"),
    ("prb_desc", "state_var"), ("prb_desc", "text_blk_lpos"),
    ("prb_data_blk_lpos", "begin"), ("prb_data_blk_lpos", "next"),
    ("printk_info", "seq"), ("printk_info", "ts_nsec"), ("printk_info", "text_len"),
    ("printk_info", "caller_id"), ("printk_info", "dev_info"),
    ("dev_printk_info", "subsystem"), ("dev_printk_info", "device"),
    ("prb_data_ring", "size_bits"), ("prb_data_ring", "data"),
    ("prb_data_ring", "head_lpos"), ("prb_data_ring", "tail_lpos"),
    ("latched_seq", "val"),
]
STRUCT_SIZES = ["mem_section", "page", "pglist_data", "zone", "free_area", "list_head",
                "printk_ringbuffer", "prb_desc_ring", "prb_desc", "prb_data_blk_lpos",
                "printk_info", "dev_printk_info", "prb_data_ring", "latched_seq"]
TYPEDEF_SIZES = ["nodemask_t", "atomic_long_t"]
# Plain symbols whose address the kernel writes (SYMBOL(x)=&x).
SYMBOLS = ["init_uts_ns", "_stext", "mem_map", "contig_page_data", "node_data",
           "prb", "printk_rb_static", "clear_seq", "init_top_pgt",
           "kallsyms_names", "kallsyms_num_syms", "kallsyms_token_table",
           "kallsyms_token_index", "kallsyms_offsets"]
# Enumerators the kernel writes as NUMBER(x).
ENUM_NUMBERS = ["NR_FREE_PAGES", "PG_lru", "PG_private", "PG_swapcache", "PG_swapbacked",
                "PG_hwpoison"]


@dataclass
class VmcoreInfo:
    """The note's lines in order, and what could not be written and why."""

    entries: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def add(self, key: str, value: str) -> None:
        self.entries.append((key, value))

    def text(self) -> str:
        return "".join(f"{k}={v}\n" for k, v in self.entries)

    def data(self) -> bytes:
        return self.text().encode()

    def get(self, key: str) -> Optional[str]:
        for k, v in self.entries:
            if k == key:
                return v
        return None

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None


def parse(text: str | bytes) -> dict[str, str]:
    """``KEY=value`` lines -> dict (the first occurrence of a key wins, as in drgn)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    out: dict[str, str] = {}
    for line in text.split("\n"):
        key, eq, value = line.partition("=")
        if eq and key not in out:
            out[key] = value
    return out


def build(live: Any, la57: Optional[bool] = None, crashtime: Optional[int] = None,
          osrelease: Optional[str] = None) -> VmcoreInfo:
    """VMCOREINFO for the kernel ``live`` (a vmm.kernel LiveKernel) is attached to.

    ``la57``: whether the guest uses 5-level paging (default: the live view's CR4,
    else the kernel's own __pgtable_l5_enabled). ``crashtime``: seconds since the
    epoch for CRASHTIME (default: now). ``osrelease`` overrides the release string
    read from init_uts_ns.
    """
    kernel = live.kernel
    symbols = kernel.symbols
    btf = kernel.btf if kernel.has_btf else None
    slide = live.slide
    info = VmcoreInfo()

    def read_u64(kva: int) -> int:
        return struct.unpack("<Q", live.read_kva(kva, 8))[0]

    def sym_addr(name: str) -> Optional[int]:
        s = symbols.get(name)
        return None if s is None else (s.address + slide) & (2**64 - 1)

    def attempt(key: str, fn: Callable[[], Optional[str]], why_missing: str) -> None:
        try:
            value = fn()
        except VmmError as exc:
            info.skipped.append((key, str(exc)))
            return
        if value is None:
            info.skipped.append((key, why_missing))
        else:
            info.add(key, value)

    # --- identity
    release = osrelease if osrelease is not None else _read_release(live, btf)
    if not release:
        raise ImageError("cannot write VMCOREINFO: init_uts_ns.name.release is not readable "
                         "in guest memory (is the kernel past start_kernel?)")
    info.add("OSRELEASE", release)
    if kernel.build_id:
        info.add("BUILD-ID", kernel.build_id)
    else:
        info.skipped.append(("BUILD-ID", "the vmlinux has no build-id note"))
    info.add("PAGESIZE", str(PAGE_SIZE))
    attempt("SYMBOL(init_uts_ns)", lambda: _hex(sym_addr("init_uts_ns")), "no symbol init_uts_ns")

    # --- paging
    if la57 is None:
        la57 = live.la57
        if not la57 and sym_addr("__pgtable_l5_enabled") is not None and live.cr3 is None:
            la57 = bool(struct.unpack("<I", live.read_kva(sym_addr("__pgtable_l5_enabled"), 4))[0])
    pgd = sym_addr("init_top_pgt") or sym_addr("swapper_pg_dir")
    if pgd is None:
        if live.cr3 is None:
            raise ImageError("cannot write VMCOREINFO: the kernel has neither init_top_pgt "
                             "nor swapper_pg_dir, and no CR3 was given to stand in for it")
        # A kernel without the symbol (our test guests): name the root table CR3 points
        # at by its image-map alias, which readers turn back into CR3 with phys_base.
        pgd = ((live.cr3 & 0x000FFFFFFFFFF000) + START_KERNEL_MAP - live.phys_base) & (2**64 - 1)
    attempt("SYMBOL(node_online_map)", lambda: _node_online_map(btf, sym_addr),
            "no node_states symbol / N_ONLINE enumerator")
    info.add("SYMBOL(swapper_pg_dir)", f"{pgd:x}")
    attempt("SYMBOL(_stext)", lambda: _hex(sym_addr("_stext")), "no symbol _stext")
    vmalloc_base = sym_addr("vmalloc_base")
    info.add("NUMBER(VMALLOC_START)", "0x%x" % (
        read_u64(vmalloc_base) if vmalloc_base is not None
        else (VMALLOC_START_5L if la57 else VMALLOC_START_4L)))

    for name in SYMBOLS[2:4]:  # mem_map, contig_page_data (FLATMEM / !NUMA)
        attempt(f"SYMBOL({name})", lambda n=name: _hex(sym_addr(n)), f"no symbol {name}")
    vmemmap_base = sym_addr("vmemmap_base")
    info.add("SYMBOL(vmemmap)", "%x" % (
        read_u64(vmemmap_base) if vmemmap_base is not None
        else (VMEMMAP_START_5L if la57 else VMEMMAP_START_4L)))
    max_physmem_bits = 52 if la57 else 46
    ms = sym_addr("mem_section")
    if ms is not None:
        # SPARSEMEM_EXTREME: mem_section is a pointer; the kernel writes its value.
        info.add("SYMBOL(mem_section)", f"{read_u64(ms):x}")
        if btf is not None:
            attempt("LENGTH(mem_section)",
                    lambda: str(_nr_section_roots(btf, max_physmem_bits)),
                    "no struct mem_section in BTF")
    else:
        info.skipped.append(("SYMBOL(mem_section)", "no symbol mem_section (not SPARSEMEM)"))
    info.add("NUMBER(SECTION_SIZE_BITS)", str(SECTION_SIZE_BITS))
    info.add("NUMBER(MAX_PHYSMEM_BITS)", str(max_physmem_bits))

    # --- structure layout (BTF)
    if btf is None:
        info.skipped.append(("SIZE/OFFSET/LENGTH/NUMBER(enum)", "the kernel has no BTF"))
    else:
        for name in STRUCT_SIZES:
            attempt(f"SIZE({name})", lambda n=name: str(btf.sizeof(f"struct {n}")),
                    f"no struct {name}")
        for name in TYPEDEF_SIZES:
            attempt(f"SIZE({name})", lambda n=name: str(btf.sizeof(n)), f"no type {name}")
        for struct_name, fields in STRUCT_OFFSETS:
            _offset(info, btf, struct_name, fields)
        _offset(info, btf, "atomic_long_t", "counter", typedef=True)
        for key, sname, fname in (("zone.free_area", "zone", "free_area"),
                                  ("free_area.free_list", "free_area", "free_list"),
                                  ("printk_info_subsystem", "dev_printk_info", "subsystem"),
                                  ("printk_info_device", "dev_printk_info", "device")):
            attempt(f"LENGTH({key})", lambda s=sname, f=fname: _nelems(btf, s, f),
                    f"struct {sname}.{fname} is not an array")
        for name in ENUM_NUMBERS:
            attempt(f"NUMBER({name})", lambda n=name: str(btf.enum_value(n)),
                    f"no enumerator {name}")
        attempt("NUMBER(PG_head_mask)", lambda: str(1 << btf.enum_value("PG_head")),
                "no enumerator PG_head")
        for kind in ("slab", "buddy", "hugetlb", "offline", "unaccepted"):
            # page_type values (enum pagetype, 6.12+): PGTY_x << 24.
            attempt(f"NUMBER(PAGE_{kind.upper()}_MAPCOUNT_VALUE)",
                    lambda k=kind: str(btf.enum_value(f"PGTY_{k}") << 24),
                    f"no enumerator PGTY_{kind}")
    for name in SYMBOLS[4:]:
        attempt(f"SYMBOL({name})", lambda n=name: _hex(sym_addr(n)), f"no symbol {name}")

    # --- x86-64 (arch_crash_save_vmcoreinfo)
    info.add("NUMBER(phys_base)", str(_signed(live.phys_base)))
    info.add("NUMBER(pgtable_l5_enabled)", "1" if la57 else "0")
    info.add("KERNELOFFSET", f"{slide & (2**64 - 1):x}")
    info.add("NUMBER(KERNEL_IMAGE_SIZE)",
             str(KERNEL_IMAGE_SIZE_KASLR if symbols.get("__kaslr_get_random_long") or slide
                 else KERNEL_IMAGE_SIZE))
    info.add("NUMBER(sme_mask)", "0")
    info.add("CRASHTIME", str(int(time.time()) if crashtime is None else int(crashtime)))
    return info


def _hex(v: Optional[int]) -> Optional[str]:
    return None if v is None else f"{v:x}"


def _signed(v: int) -> int:
    v &= 2**64 - 1
    return v - 2**64 if v >> 63 else v


def _read_release(live: Any, btf: Any) -> str:
    raw = b""
    try:
        if btf is not None:
            raw = live.read("init_uts_ns", "name.release", type="struct uts_namespace")
        else:
            raise VmmError("no BTF")
    except VmmError:
        # Without BTF: struct uts_namespace starts with its name (struct new_utsname,
        # six 65-byte strings; release is the third) on every kernel since 2.6.
        sym = live.symbols.get("init_uts_ns")
        if sym is None:
            return ""
        raw = live.read_kva((sym.address + live.slide) + 4 + 2 * 65, 65)  # after kref
    if isinstance(raw, int):
        return ""
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def _node_online_map(btf: Any, sym_addr: Callable[[str], Optional[int]]) -> Optional[str]:
    base = sym_addr("node_states")
    if base is None or btf is None:
        return None
    return f"{base + btf.enum_value('N_ONLINE') * btf.sizeof('nodemask_t'):x}"


def _nr_section_roots(btf: Any, max_physmem_bits: int) -> int:
    sections_per_root = PAGE_SIZE // btf.sizeof("struct mem_section")
    nr_mem_sections = 1 << (max_physmem_bits - SECTION_SIZE_BITS)
    return -(-nr_mem_sections // sections_per_root)


def _nelems(btf: Any, struct_name: str, field_name: str) -> Optional[str]:
    f = btf.field(f"struct {struct_name}", field_name)
    t = btf.resolve(f.type)
    return str(t.nelems) if t.kind_name == "array" else None


def _offset(info: VmcoreInfo, btf: Any, struct_name: str, fields: str,
            typedef: bool = False) -> None:
    tname = struct_name if typedef else f"struct {struct_name}"
    errors = []
    for fname in fields.split("|"):
        try:
            info.add(f"OFFSET({struct_name}.{fname})", str(btf.offsetof(tname, fname)))
            return
        except VmmError as exc:
            errors.append(str(exc))
    info.skipped.append((f"OFFSET({struct_name}.{fields.split('|')[0]})", "; ".join(errors)))
