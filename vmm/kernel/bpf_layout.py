"""Where a BPF map lives in the guest kernel, from its symbols and BTF, and the walk of
the map table; no values (vmm.kernel.bpf_values) and no view (vmm.kernel.bpf_maps).

Layout (checked against Linux 7.3: kernel/bpf/syscall.c, include/linux/bpf.h,
kernel/bpf/arraymap.c, kernel/bpf/btf.c, include/linux/xarray.h, lib/xarray.c):

- ``static DEFINE_IDR(map_idr)``: ``struct idr`` -> ``idr_rt`` (``struct xarray``;
  radix_tree_root is xarray) -> ``xa_head``. A map's id is its index + ``idr_base``.
  An entry whose low two bits are ``10`` is internal: above 4096 it is a node
  (``struct xa_node *`` = entry - 2; ``shift``, ``slots[XA_CHUNK_SIZE]``: slot i of a node
  at ``shift`` s covers indices base + (i << s)); below it sibling, retry and zero entries
  (skipped). Low bit 1 is a value entry (never a map; skipped). Anything else is a
  ``struct bpf_map *``. A head that is not a node is the entry of index 0.
- ``struct bpf_map``: ``map_type`` (``enum bpf_map_type``; named as bpftool does, the
  enumerator without ``BPF_MAP_TYPE_``, lower case: "array", "percpu_array"), ``key_size``,
  ``value_size``, ``max_entries``, ``map_flags``, ``id``, ``name`` (``char[BPF_OBJ_NAME_LEN]``:
  libbpf names a global-data map "<obj prefix>.bss", cut to 15 characters),
  ``btf_key_type_id``, ``btf_value_type_id``, ``btf`` (``struct btf *`` or NULL).
- ``struct bpf_array`` (a map of type array or percpu_array; ``map`` is its first member):
  ``elem_size`` (value_size rounded up to 8); array: value of key k at ``value + elem_size
  * k``; percpu_array: ``pptrs[k]`` is a per-CPU pointer, CPU c's copy at ``pptrs[k] +
  __per_cpu_offset[c]``.
- ``struct btf`` of a map loaded from an object: standalone BTF (btf_parse): ``data`` /
  ``data_size`` are the raw blob user space loaded (header included), parsed here with
  vmm.kernel.btf. A map whose ``btf`` is the kernel's own (``kernel_btf``) is decoded with
  the vmlinux BTF; a split BTF (``base_btf`` set) is not decoded (raw bytes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable, Optional

from vmm.errors import KernelFeatureMissing, VmmError

MAX_NODES = 1 << 16              # xa_nodes one walk may visit (a corrupt or changing tree)
XA_NODE_MIN = 4096               # xa_is_node: internal entries above this are nodes
#: enum bpf_map_type values when BTF lacks the enum (6.x .. 7.3), bpftool's spelling.
ARRAY_TYPES = {"array", "percpu_array"}
HASH_TYPES = {"hash", "percpu_hash", "lru_hash", "lru_percpu_hash"}


@dataclass(frozen=True)
class BpfLayout:
    """Where everything is, from the kernel's symbols and BTF (no guest memory read)."""

    idr_head_off: int
    idr_base_off: int
    node_shift_off: int
    node_slots_off: int
    chunk: int                       # XA_CHUNK_SIZE (slots per node)
    map: dict[str, int]              # struct bpf_map member -> offset
    name_len: int
    array_elem_size_off: int
    array_value_off: int
    array_pptrs_off: int
    btf_data_off: int
    btf_data_size_off: int
    btf_base_off: Optional[int]
    btf_kernel_off: Optional[int]
    types: dict[int, str] = field(default_factory=dict)
    #: struct bpf_htab buckets / n_buckets, struct bucket size, htab_elem.key, the
    #: hlist_nulls_node's next: None when BTF lacks them (hash values then refused)
    hash: Optional[dict[str, int]] = None

    @classmethod
    def of(cls, kernel) -> "BpfLayout":
        """The layout of ``kernel`` (a vmm.kernel.Kernel); KernelFeatureMissing naming what
        this kernel lacks."""
        if "map_idr" not in kernel.symbols:
            raise KernelFeatureMissing(
                "this kernel has no BPF maps to read (no map_idr symbol): build it with "
                "CONFIG_BPF_SYSCALL=y (and a vmlinux with its local symbols)")
        if not kernel.has_btf:
            raise KernelFeatureMissing("this kernel has no BTF (CONFIG_DEBUG_INFO_BTF): BPF "
                                       "maps are read through it")
        btf = kernel.btf

        def off(struct_name: str, path: str, optional: bool = False) -> Optional[int]:
            try:
                return btf.field(struct_name, path).offset
            except VmmError as e:
                if optional:
                    return None
                raise KernelFeatureMissing(f"BPF maps: {struct_name} has no {path!r} in this "
                                           f"kernel's BTF ({e})") from None

        try:
            slots = btf.field("struct xa_node", "slots")
        except VmmError as e:
            raise KernelFeatureMissing(f"BPF maps: no struct xa_node.slots in BTF ({e})") from None
        chunk = btf.resolve(slots.type).nelems
        if chunk not in (16, 64):
            raise KernelFeatureMissing(f"BPF maps: xa_node has {chunk} slots (16 or 64 known)")
        names = ("map_type", "key_size", "value_size", "max_entries", "map_flags", "id",
                 "btf_key_type_id", "btf_value_type_id", "btf", "name")
        mp = {n: off("struct bpf_map", n) for n in names}
        if off("struct bpf_array", "map") != 0:
            raise KernelFeatureMissing("BPF maps: struct bpf_array does not start with its map")
        types: dict[int, str] = {}
        try:
            enum = btf.type("enum bpf_map_type")
            for e in enum.enum_values:
                short = e.name[len("BPF_MAP_TYPE_"):].lower() if e.name.startswith("BPF_MAP_TYPE_") else e.name
                if e.value not in types or types[e.value].endswith("_deprecated"):
                    types[e.value] = short
        except VmmError:
            pass
        return cls(
            idr_head_off=off("struct idr", "idr_rt.xa_head"),
            idr_base_off=off("struct idr", "idr_base"),
            node_shift_off=off("struct xa_node", "shift"), node_slots_off=slots.offset,
            chunk=chunk, map=mp, name_len=btf.field("struct bpf_map", "name").size,
            array_elem_size_off=off("struct bpf_array", "elem_size"),
            array_value_off=off("struct bpf_array", "value"),
            array_pptrs_off=off("struct bpf_array", "pptrs"),
            btf_data_off=off("struct btf", "data"),
            btf_data_size_off=off("struct btf", "data_size"),
            btf_base_off=off("struct btf", "base_btf", optional=True),
            btf_kernel_off=off("struct btf", "kernel_btf", optional=True),
            types=types, hash=_hash_layout(btf))

    def type_name(self, value: int) -> str:
        """"array" for BPF_MAP_TYPE_ARRAY's value; "type N" for one BTF does not name."""
        return self.types.get(value, f"type {value}")


def _hash_layout(btf) -> Optional[dict[str, int]]:
    """kernel/bpf/hashtab.c's layout (its structs are static there; pahole keeps them)."""
    try:
        return {"buckets": btf.offsetof("struct bpf_htab", "buckets"),
                "n_buckets": btf.offsetof("struct bpf_htab", "n_buckets"),
                "bucket_size": btf.sizeof("struct bucket"),
                "head_first": btf.offsetof("struct bucket", "head.first"),
                "node": btf.offsetof("struct htab_elem", "hash_node"),
                "next": btf.offsetof("struct hlist_nulls_node", "next"),
                "key": btf.offsetof("struct htab_elem", "key")}
    except VmmError:
        return None


def _u8(b: bytes, off: int = 0) -> int:
    return b[off]


def _u32(b: bytes, off: int = 0) -> int:
    return struct.unpack_from("<I", b, off)[0]


def _u64(b: bytes, off: int = 0) -> int:
    return struct.unpack_from("<Q", b, off)[0]


def walk_xarray(read_kva: Callable[[int, int], bytes], head: int, lay: BpfLayout,
                max_nodes: int = MAX_NODES) -> list[tuple[int, int]]:
    """[(index, entry)] of every pointer entry under ``head`` (an xarray's xa_head), in
    index order (module doc for the encoding). VmmError on a tree that cannot be right
    (a child's shift not its parent's less one chunk, more than ``max_nodes`` nodes)."""
    out: list[tuple[int, int]] = []
    bits = lay.chunk.bit_length() - 1
    node_size = lay.node_slots_off + 8 * lay.chunk
    visited = [0]

    def is_node(entry: int) -> bool:
        return entry & 3 == 2 and entry > XA_NODE_MIN

    def walk(entry: int, base: int, want_shift: Optional[int]) -> None:
        visited[0] += 1
        if visited[0] > max_nodes:
            raise VmmError(f"xarray walk: more than {max_nodes} nodes (a changing or corrupt "
                           f"tree: read it frozen)")
        node = entry - 2
        raw = read_kva(node, node_size)
        shift = _u8(raw, lay.node_shift_off)
        if shift % bits or shift > 64 or (want_shift is not None and shift != want_shift):
            raise VmmError(f"xarray walk: node {node:#x} has shift {shift}"
                           + (f", expected {want_shift}" if want_shift is not None else "")
                           + " (a changing or corrupt tree: read it frozen)")
        slots = struct.unpack_from(f"<{lay.chunk}Q", raw, lay.node_slots_off)
        for i, child in enumerate(slots):
            if child == 0:
                continue
            index = base + (i << shift)
            if is_node(child):
                if shift == 0:
                    raise VmmError(f"xarray walk: a node below leaf node {node:#x}")
                walk(child, index, shift - bits)
            elif child & 3 == 0:
                out.append((index, child))
            # else: a value, sibling, retry or zero entry: no map

    if head == 0:
        return out
    if is_node(head):
        walk(head, 0, None)
    elif head & 3 == 0:
        out.append((0, head))
    return out
