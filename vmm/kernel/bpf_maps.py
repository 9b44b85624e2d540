"""BPF maps read from the host through BTF: every loaded map, and the values of array,
per-CPU array and global-data (.bss/.data/.rodata) maps decoded with the map's own BTF.
No agent in the guest, no BPF syscall.

Where things are (map_idr's xarray, struct bpf_map, bpf_array, bpf_htab, btf):
vmm.kernel.bpf_layout.

Values are decoded with the map's BTF by vmm.kernel.bpf_values (a struct becomes a dict,
a .bss/.data/.rodata section a dict of its variables, ...); without BTF a value is the
raw bytes.

Hash maps (hash, percpu_hash, lru_hash, lru_percpu_hash) are read-only: ``struct bpf_htab``
-> ``buckets[n_buckets]`` (``struct bucket``: ``head.first``), each chain of ``struct
htab_elem`` through ``hash_node.next`` up to a nulls marker (low bit 1); the key at
``key``, the value (a per-CPU pointer for the per-CPU kinds) at ``key + round_up(key_size,
8)``. ``items()`` lists them, ``read(key)`` finds one.

Writes are planned here and applied by the caller (the session: one cold batch through
vmm/ops, every vCPU parked): every field named, its width and its value range are checked
before anything is written; unknown names suggest close ones.

The reader needs ``live.kernel``, ``live.symbol_address``, ``live.read_kva``,
``live.per_cpu_offset`` and ``live.possible_cpus`` (vmm.kernel.live.LiveKernel).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ContextManager, Optional

from vmm.errors import FieldPathError, InvalidValue, KernelFeatureMissing, TargetError, VmmError
from vmm.kernel.bpf_layout import (ARRAY_TYPES, HASH_TYPES, BpfLayout,  # noqa: F401 (re-exported)
                                  _u32, _u64, walk_xarray)
from vmm.kernel.bpf_values import WriteEntry, decode_value, encode_field, locate_field
from vmm.kernel.btf import DATASEC, Btf
from vmm.kernel.suggest import hint

BTF_MAX_SIZE = 16 << 20          # the kernel's own limit on a loaded BTF blob
MAX_MAPS = 1 << 20


class BpfMapError(VmmError, LookupError):
    """No such map, an unknown field, a key out of range, a map type not supported."""


@dataclass(frozen=True)
class BpfMap:
    """One loaded BPF map: what bpftool's ``map list`` shows, and where it is.

    type: bpftool's name ("array", "percpu_array", "hash", ".."); type_value: the enum
    value; kva: its struct bpf_map; btf: its struct btf (0: none). ``read``/``write`` go
    through the view that listed it (``m.bpf``).
    """

    id: int
    name: str
    type: str
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0
    type_value: int = 0
    kva: int = 0
    btf: int = 0
    btf_key_type_id: int = 0
    btf_value_type_id: int = 0
    view: Any = field(default=None, compare=False, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (without the view)."""
        d = asdict(self)
        d.pop("view")
        return d

    def describe(self) -> str:
        """One line like bpftool's: ``12: array  name scx_qmap.bss  key 4B  value 48B  max_entries 1``."""
        return (f"{self.id}: {self.type}  name {self.name}  key {self.key_size}B  value "
                f"{self.value_size}B  max_entries {self.max_entries}")

    def _v(self) -> "BpfView":
        if self.view is None:
            raise VmmError(f"BPF map {self.name!r} was not listed through a view (m.bpf)")
        return self.view

    def read(self, key: int = 0, cpu: Optional[int] = None, freeze: bool = True) -> Any:
        """The value of ``key`` decoded with the map's BTF (module doc); a per-CPU array
        gives a list, one value per possible CPU (``cpu=N``: that CPU's only)."""
        return self._v().read(self, key, cpu=cpu, freeze=freeze)

    def items(self, cpu: Optional[int] = None, freeze: bool = True) -> list:
        """[(key, value)] of every element: an array's keys in order, a hash map's
        elements bucket by bucket (keys decoded with the key's BTF type, else an int for a
        1/2/4/8-byte key, else bytes)."""
        return self._v().items(self, cpu=cpu, freeze=freeze)

    def read_raw(self, key: int = 0, cpu: Optional[int] = None, freeze: bool = True) -> Any:
        """The value's bytes (a list of them per CPU for a per-CPU array)."""
        return self._v().read(self, key, cpu=cpu, freeze=freeze, raw=True)

    def write(self, key: int, changes: dict, cpu: Optional[int] = None) -> Any:
        """Write ``{field: value}`` into the value of ``key`` in one cold batch (a per-CPU
        array: every possible CPU's copy, or ``cpu``'s). Everything is checked first."""
        return self._v().write(self, key, changes, cpu=cpu)

    def value_type(self) -> Optional[str]:
        """The C name of the value's BTF type ("struct stats", "DATASEC .bss"), None
        without BTF."""
        return self._v().value_type_name(self)


# --- the view -----------------------------------------------------------------------------
class BpfView:
    """``m.bpf``: the guest kernel's BPF maps from the host (vmm.session builds it).

    live: () -> a live view of the kernel (LiveKernel); freeze: () -> a context manager
    that parks every vCPU; frozen: () -> True while the caller holds a freeze;
    write: ([WriteEntry]) -> result, one checked cold batch (the session's ops path).
    """

    def __init__(self, kernel, live: Callable[[], Any],
                 freeze: Callable[[], ContextManager] = lambda: nullcontext(),
                 frozen: Callable[[], bool] = lambda: False,
                 write: Optional[Callable[[list], Any]] = None):
        self.kernel = kernel
        self._live, self._freeze, self._frozen, self._write = live, freeze, frozen, write
        self._layout: Optional[BpfLayout] = None
        self._btfs: dict[tuple, Optional[Btf]] = {}

    @property
    def layout(self) -> BpfLayout:
        """The kernel's BPF layout (KernelFeatureMissing when it has none)."""
        if self._layout is None:
            self._layout = BpfLayout.of(self.kernel)
        return self._layout

    def _hold(self, freeze: bool) -> ContextManager:
        return self._freeze() if freeze and not self._frozen() else nullcontext()

    # --- listing ------------------------------------------------------------------------
    def maps(self, freeze: bool = True) -> list[BpfMap]:
        """Every loaded map, by id (walks map_idr; ``freeze=False`` walks the running
        kernel, which may change under the walk: VmmError then)."""
        lay = self.layout
        with self._hold(freeze):
            live = self._live()
            return self._maps(live, lay)

    def _maps(self, live, lay: BpfLayout) -> list[BpfMap]:
        idr = live.symbol_address("map_idr")
        head = _u64(live.read_kva(idr + lay.idr_head_off, 8))
        base = _u32(live.read_kva(idr + lay.idr_base_off, 4))
        out = []
        for index, kva in walk_xarray(live.read_kva, head, lay):
            m = self._map_at(live, lay, kva)
            if m.id != index + base:
                raise VmmError(f"map_idr index {index + base} holds a map whose id reads "
                               f"{m.id} (kva {kva:#x}): read it frozen")
            out.append(m)
            if len(out) > MAX_MAPS:
                raise VmmError(f"map_idr: more than {MAX_MAPS} maps")
        return out

    def _map_at(self, live, lay: BpfLayout, kva: int) -> BpfMap:
        o = lay.map
        end = max(o.values()) + lay.name_len
        raw = live.read_kva(kva, end)
        t = _u32(raw, o["map_type"])
        name = raw[o["name"]:o["name"] + lay.name_len].split(b"\0", 1)[0].decode("utf-8", "replace")
        return BpfMap(id=_u32(raw, o["id"]), name=name, type=lay.type_name(t),
                      key_size=_u32(raw, o["key_size"]), value_size=_u32(raw, o["value_size"]),
                      max_entries=_u32(raw, o["max_entries"]), flags=_u32(raw, o["map_flags"]),
                      type_value=t, kva=kva, btf=_u64(raw, o["btf"]),
                      btf_key_type_id=_u32(raw, o["btf_key_type_id"]),
                      btf_value_type_id=_u32(raw, o["btf_value_type_id"]), view=self)

    def map(self, name, freeze: bool = True) -> BpfMap:
        """The map named ``name`` (an int: the map of that id). A section name (".bss")
        finds the one map whose name ends with it. BpfMapError suggesting close names
        when there is none, listing the ids when several share the name."""
        maps = self.maps(freeze=freeze)
        if isinstance(name, int) and not isinstance(name, bool):
            hit = [m for m in maps if m.id == name]
            if not hit:
                raise BpfMapError(f"no BPF map with id {name}; ids loaded: "
                                  f"{[m.id for m in maps] or 'none'}")
            return hit[0]
        hit = [m for m in maps if m.name == name]
        if not hit and name.startswith("."):
            hit = [m for m in maps if m.name.endswith(name)]
        if len(hit) == 1:
            return hit[0]
        if hit:
            raise BpfMapError(f"{len(hit)} BPF maps match {name!r}: "
                              + ", ".join(f"id {m.id} {m.name!r}" for m in hit)
                              + ": pass the id, m.bpf.map(ID)")
        names = [m.name for m in maps]
        if not names:
            raise BpfMapError(f"no BPF map named {name!r}: no map is loaded in the guest")
        raise BpfMapError(f"no BPF map named {name!r}" + hint(name, names)
                          + f" ({len(names)} loaded: m.bpf.maps())")

    # --- BTF ----------------------------------------------------------------------------
    def map_btf(self, m: BpfMap, live=None) -> Optional[Btf]:
        """The map's own BTF parsed (cached per struct btf), None when it has none or it is
        split BTF (which is not decoded)."""
        if not m.btf:
            return None
        lay = self.layout
        live = live or self._live()
        raw = live.read_kva(m.btf, max(lay.btf_data_size_off + 4, lay.btf_data_off + 8,
                                       (lay.btf_base_off or 0) + 8, (lay.btf_kernel_off or 0) + 1))
        data, size = _u64(raw, lay.btf_data_off), _u32(raw, lay.btf_data_size_off)
        base = _u64(raw, lay.btf_base_off) if lay.btf_base_off is not None else 0
        kernel_btf = bool(raw[lay.btf_kernel_off]) if lay.btf_kernel_off is not None else False
        key = (m.btf, data, size, base, kernel_btf)
        if key in self._btfs:
            return self._btfs[key]
        if kernel_btf and not base:
            btf: Optional[Btf] = self.kernel.btf
        elif base:
            btf = None
        else:
            if not 0 < size <= BTF_MAX_SIZE:
                raise VmmError(f"map {m.name!r}: its BTF's data_size reads {size} (not 1 .. "
                               f"{BTF_MAX_SIZE}): read it frozen")
            btf = Btf(live.read_kva(data, size))
        self._btfs[key] = btf
        return btf

    def value_type_name(self, m: BpfMap) -> Optional[str]:
        """The C name of ``m``'s value type, None without BTF."""
        btf = self.map_btf(m)
        if btf is None or not m.btf_value_type_id:
            return None
        t = btf.resolve(m.btf_value_type_id)
        return f"DATASEC {t.name}" if t.kind == DATASEC else btf.type_name(t)

    # --- values -------------------------------------------------------------------------
    def _check_alive(self, live, m: BpfMap) -> None:
        now = _u32(live.read_kva(m.kva + self.layout.map["id"], 4))
        if now != m.id:
            raise BpfMapError(f"map {m.name!r} (id {m.id}) is gone: its memory now reads id "
                              f"{now}; list the maps again")

    def _check(self, live, m: BpfMap, key) -> int:
        if m.type not in ARRAY_TYPES:
            raise BpfMapError(f"map {m.name!r} is a {m.type} map: values are read for array "
                              f"and percpu_array maps (and the .bss/.data/.rodata sections, "
                              f"which are arrays), and read-only for hash maps; written for "
                              f"arrays only")
        if isinstance(key, (bytes, bytearray)) and len(key) == 4:
            key = int.from_bytes(key, "little")
        if isinstance(key, bool) or not isinstance(key, int):
            raise BpfMapError(f"map {m.name!r}: an array's key is an int, not {key!r:.40}")
        if not 0 <= key < m.max_entries:
            raise BpfMapError(f"map {m.name!r}: key {key} is out of range (max_entries "
                              f"{m.max_entries})")
        self._check_alive(live, m)
        return key

    def _value_kvas(self, live, m: BpfMap, key: int, cpu: Optional[int]) -> list[tuple[Optional[int], int]]:
        """[(cpu or None, kva of the value)]."""
        lay = self.layout
        if m.type == "array":
            if cpu is not None:
                raise BpfMapError(f"map {m.name!r} is not per-CPU: no cpu= for it")
            elem = _u32(live.read_kva(m.kva + lay.array_elem_size_off, 4))
            if elem != (m.value_size + 7) // 8 * 8:  # round_up(value_size, 8)
                raise VmmError(f"map {m.name!r}: elem_size reads {elem} for value_size "
                               f"{m.value_size}")
            return [(None, m.kva + lay.array_value_off + elem * key)]
        pptr = _u64(live.read_kva(m.kva + lay.array_pptrs_off + 8 * key, 8))
        cpus = live.possible_cpus() if cpu is None else [cpu]
        return [(c, (pptr + live.per_cpu_offset(c)) & (1 << 64) - 1) for c in cpus]

    def _decode(self, btf: Optional[Btf], type_id: int, blob: bytes) -> Any:
        return decode_value(btf, type_id, blob) if btf is not None and type_id else blob

    def _key_of(self, btf: Optional[Btf], m: BpfMap, blob: bytes) -> Any:
        if btf is not None and m.btf_key_type_id:
            return decode_value(btf, m.btf_key_type_id, blob)
        return int.from_bytes(blob, "little") if len(blob) in (1, 2, 4, 8) else blob

    def _hash_elems(self, live, m: BpfMap) -> list[tuple[bytes, int]]:
        """[(key bytes, kva of the value or of its per-CPU pointer)], bucket by bucket
        (kernel/bpf/hashtab.c: buckets[i].head.first -> htab_elem.hash_node ->
        .next ..., a nulls marker (low bit 1) ends a chain; the value at key +
        round_up(key_size, 8))."""
        h = self.layout.hash
        if h is None:
            raise KernelFeatureMissing("this kernel's BTF lacks struct bpf_htab / bucket / "
                                       "htab_elem: hash maps cannot be read")
        head = live.read_kva(m.kva + h["buckets"], 8)
        buckets = _u64(head)
        n = _u32(live.read_kva(m.kva + h["n_buckets"], 4))
        if not 0 < n <= 1 << 31 or n & (n - 1):
            raise VmmError(f"map {m.name!r}: n_buckets reads {n} (not a power of two)")
        limit = 2 * m.max_entries + 4096   # elements in flight, per-CPU extras: bounded
        out: list[tuple[bytes, int]] = []
        key_off, vskip = h["key"], (m.key_size + 7) // 8 * 8
        chunk = 4096 // h["bucket_size"]
        for first in range(0, n, chunk):
            count = min(chunk, n - first)
            raw = live.read_kva(buckets + first * h["bucket_size"], count * h["bucket_size"])
            for b in range(count):
                node = _u64(raw, b * h["bucket_size"] + h["head_first"])
                while not node & 1 and node:
                    elem = node - h["node"]
                    out.append((live.read_kva(elem + key_off, m.key_size), elem + key_off + vskip))
                    if len(out) > limit:
                        raise VmmError(f"map {m.name!r}: more than {limit} elements in its "
                                       f"buckets (a chain changing under the walk: read it "
                                       f"frozen)")
                    node = _u64(live.read_kva(node + h["next"], 8))
        return out

    def items(self, m: BpfMap, cpu: Optional[int] = None, freeze: bool = True) -> list:
        """BpfMap.items."""
        with self._hold(freeze):
            live = self._live()
            self._check_alive(live, m)
            btf = self.map_btf(m, live)
            if m.type in ARRAY_TYPES:
                if m.max_entries > 1 << 16:
                    raise BpfMapError(f"map {m.name!r} has {m.max_entries} entries: read "
                                      f"keys one by one")
                return [(k, self.read(m, k, cpu=cpu, freeze=False)) for k in range(m.max_entries)]
            if m.type not in HASH_TYPES:
                raise BpfMapError(f"map {m.name!r} is a {m.type} map: items() reads array "
                                  f"and hash maps")
            percpu = m.type.endswith("percpu_hash")
            cpus = (live.possible_cpus() if cpu is None else [cpu]) if percpu else []
            out = []
            for kb, vkva in self._hash_elems(live, m):
                if percpu:
                    pptr = _u64(live.read_kva(vkva, 8))
                    blobs = [live.read_kva((pptr + live.per_cpu_offset(c)) & (1 << 64) - 1,
                                           m.value_size) for c in cpus]
                    vals = [self._decode(btf, m.btf_value_type_id, b) for b in blobs]
                    value: Any = vals if cpu is None else vals[0]
                else:
                    value = self._decode(btf, m.btf_value_type_id,
                                         live.read_kva(vkva, m.value_size))
                out.append((self._key_of(btf, m, kb), value))
            return out

    def _read_hash(self, m: BpfMap, key, cpu: Optional[int], freeze: bool) -> Any:
        """The value of the element whose decoded key equals ``key`` (an int, a dict for
        a struct key, bytes without BTF)."""
        for k, v in self.items(m, cpu=cpu, freeze=freeze):
            if k == key:
                return v
        raise BpfMapError(f"map {m.name!r} has no element with key {key!r:.60}")

    def read(self, m: BpfMap, key: int = 0, cpu: Optional[int] = None, freeze: bool = True,
             raw: bool = False) -> Any:
        """BpfMap.read / read_raw (a hash map: the element whose key equals ``key``)."""
        if m.type in HASH_TYPES and not raw:
            return self._read_hash(m, key, cpu, freeze)
        with self._hold(freeze):
            live = self._live()
            key = self._check(live, m, key)
            places = self._value_kvas(live, m, key, cpu)
            blobs = [live.read_kva(kva, m.value_size) for _, kva in places]
            btf = None if raw else self.map_btf(m, live)
        if btf is not None and m.btf_value_type_id:
            values = [decode_value(btf, m.btf_value_type_id, b) for b in blobs]
        else:
            values = blobs
        if m.type == "percpu_array" and cpu is None:
            return values
        return values[0]

    def plan_write(self, m: BpfMap, key: int, changes: dict, cpu: Optional[int] = None,
                   live=None) -> list[WriteEntry]:
        """The stores ``write`` makes, every field, width and value checked (nothing
        written). ``changes``: {field path: value}; the path "" is the whole value (bytes
        of value_size)."""
        if not isinstance(changes, dict) or not changes:
            raise InvalidValue(f"map {m.name!r}: changes must be a non-empty dict "
                               f"{{field: value}}, not {changes!r:.40}")
        live = live or self._live()
        key = self._check(live, m, key)
        btf = self.map_btf(m, live)
        fields = []
        for path, value in changes.items():
            what = f"map {m.name!r} key {key} {path or '(whole value)'}"
            if path == "":
                if not isinstance(value, (bytes, bytearray)) or len(value) != m.value_size:
                    raise InvalidValue(f"{what}: the whole value is {m.value_size} bytes")
                fields.append((0, m.value_size, bytes(value), what))
                continue
            if btf is None or not m.btf_value_type_id:
                raise BpfMapError(f"{what}: this map has no BTF to name fields with; write "
                                  f"the whole value: {{'': bytes}}")
            try:
                off, size, ftype, bit_size = locate_field(btf, m.btf_value_type_id, path)
            except FieldPathError as e:
                raise FieldPathError(f"map {m.name!r}: {e}") from None
            if bit_size:
                raise TargetError(f"{what} is a {bit_size}-bit bitfield: whole-byte writes "
                                  f"cannot target it")
            if off + size > m.value_size:
                raise TargetError(f"{what}: bytes {off}..{off + size} lie past the value's "
                                  f"{m.value_size}")
            fields.append((off, size, encode_field(btf, ftype, size, value, what), what))
        out = []
        for c, kva in self._value_kvas(live, m, key, cpu):
            for off, size, value, what in fields:
                desc = what + (f" cpu {c}" if c is not None else "")
                out.append(WriteEntry(kva + off, size, value, desc))
        return out

    def write(self, m: BpfMap, key: int, changes: dict, cpu: Optional[int] = None) -> Any:
        """BpfMap.write: planned and checked (plan_write), then one cold batch."""
        if self._write is None:
            raise VmmError("this view cannot write guest memory")
        with self._hold(True):
            entries = self.plan_write(m, key, changes, cpu)
            return self._write(entries)
