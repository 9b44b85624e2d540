"""Guest RAM: one anonymous mapping, the only way anything touches guest memory.

Every access is bounds-checked against the RAM ranges before any byte moves, and goes
through the C primitives so that an aligned u8/u16/u32/u64 access is exactly one
load/store instruction (the guest may be reading it concurrently).

Lifetime: close() makes new accesses refuse (GuestMemoryClosed) and releases the RAM by
mapping fresh zero pages over it (vmm_discard_guest_ram), keeping the addresses; they are
unmapped when the GuestMemory object itself is gone, and every access runs inside one of
its methods, holding it. So stop() racing a hot read/write in another thread ends that
thread's loop with an error (or lets one in-flight copy land in the zero pages), never a
fault, at no cost per access.
"""

from __future__ import annotations

from vmm.arch.x86.layout import MMIO_GAP_END, MMIO_GAP_START  # RAM moves above this gap
from vmm.arch.x86.paging import PAGE_SIZE
from vmm.errors import GuestMemoryClosed, GuestMemoryError, GuestOutOfMemory
from vmm.kvm.native import native


_WIDTH_MAX = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}
SAVE_CHUNK = 1 << 20  # write_sparse scans and writes RAM this much at a time


def _map_file_private(base: int, size: int, fd: int) -> None:
    """mmap(base, size, RW, MAP_PRIVATE|MAP_FIXED, fd, 0) over the reserved RAM at base
    (which keeps its 2 MiB alignment and its discard/unmap lifetime). Through libc with
    ctypes: a set-up call, not a hot path, and the C core has no file mapping."""
    import ctypes
    import mmap as mmap_
    import os

    if os.fstat(fd).st_size < size:
        raise GuestMemoryError(f"the RAM file (fd {fd}) holds {os.fstat(fd).st_size} bytes, "
                               f"fewer than the {size} of guest RAM")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long)
    map_fixed = 0x10
    got = libc.mmap(base, size, mmap_.PROT_READ | mmap_.PROT_WRITE,
                    mmap_.MAP_PRIVATE | map_fixed, fd, 0)
    if got in (None, ctypes.c_void_p(-1).value) or got != base:
        e = ctypes.get_errno()
        native()[1].vmm_unmap(base, size)
        raise GuestMemoryError(f"cannot map the RAM file private: {os.strerror(e)}")


def nonzero_runs(chunk, size: int):
    """(offset, bytes) of each run of non-zero pages in [0, size); `chunk(off, n)` gives
    n bytes at off (a buffer, valid until the next call), SAVE_CHUNK at a time."""
    zero_chunk, zero_page = bytes(SAVE_CHUNK), bytes(PAGE_SIZE)
    for off in range(0, size, SAVE_CHUNK):
        n = min(SAVE_CHUNK, size - off)
        view = chunk(off, n)
        if view[:] == zero_chunk[:n]:
            continue
        page = 0
        while page < n:
            if view[page:page + PAGE_SIZE] == zero_page:
                page += PAGE_SIZE
                continue
            end = page + PAGE_SIZE
            while end < n and view[end:end + PAGE_SIZE] != zero_page:
                end += PAGE_SIZE
            yield off + page, view[page:end]
            page = end


def file_digest(fd: int, size: int, hasher) -> None:
    """Feeds `hasher` the file's non-zero page runs exactly as write_sparse did."""
    import os

    zero = bytes(SAVE_CHUNK)

    def chunk(off, n):
        try:  # a chunk inside a hole reads as zeros without reading
            if os.lseek(fd, off, os.SEEK_DATA) >= off + n:
                return zero[:n]
        except OSError:  # ENXIO: only holes from here on
            return zero[:n]
        return os.pread(fd, n, off).ljust(n, b"\0")

    for off, run in nonzero_runs(chunk, size):
        hasher.update(off.to_bytes(8, "little"))
        hasher.update(run)


class GuestMemory:
    """`size` bytes of guest RAM at guest-physical [0, size), split around the MMIO gap."""

    def __init__(self, size: int, backing_fd: int | None = None, split_at=()):
        """`backing_fd`: a file (or memfd) of at least `size` bytes whose pages are the
        RAM's first contents, mapped private: copy-on-write, so every GuestMemory made
        from one file shares the pages none of them wrote (snapshot clones).
        `split_at`: guest-physical addresses (2 MiB aligned) where a RAM range is cut
        into two memory slots: the NUMA nodes' boundaries (vmm.machine.topology), so
        that each slot is one node's RAM, as the guest's SRAT and e820 map say."""
        ffi, lib = native()
        if not isinstance(size, int) or size <= 0 or size % PAGE_SIZE:
            raise GuestMemoryError(f"guest memory size {size!r} must be a positive multiple of 4 KiB")
        err = ffi.new("int *")
        base = lib.vmm_map_guest_ram(size, err)
        if base == 0:
            import os
            raise GuestOutOfMemory(
                f"cannot reserve {size} bytes ({size >> 20} MiB) of guest RAM: "
                f"{os.strerror(err[0])}; ask for less memory"
            )
        if backing_fd is not None:
            _map_file_private(base, size, backing_fd)
        self.size = size
        self._base = base
        self._reserved = 0  # base of the discarded range still mapped (see close)
        if size <= MMIO_GAP_START:
            self.regions = [(0, size, base)]
        else:
            low = MMIO_GAP_START
            self.regions = [(0, low, base), (MMIO_GAP_END, size - low, base + low)]
        for cut in sorted(split_at):
            if not isinstance(cut, int) or cut % (2 << 20):
                raise GuestMemoryError(f"memory slot boundary {cut!r} must be 2 MiB aligned")
            i = next((i for i, (g, s, _) in enumerate(self.regions) if g < cut < g + s), None)
            if i is None:
                raise GuestMemoryError(f"memory slot boundary {cut:#x} is not inside a RAM range")
            g, s, host = self.regions[i]
            self.regions[i:i + 1] = [(g, cut - g, host), (cut, g + s - cut, host + (cut - g))]

    # -- lifetime ---------------------------------------------------------------
    def register(self, vm) -> None:
        """KVM_SET_USER_MEMORY_REGION for each RAM range (slots 0, 1, ...)."""
        for slot, (gpa, size, host) in enumerate(self.regions):
            vm.set_user_memory_region(slot, gpa, size, host)

    def close(self) -> None:
        """Releases the RAM; later accesses raise GuestMemoryClosed. An access in flight
        in another thread finishes in zero pages; the addresses are unmapped when this
        object is gone (__del__). The vCPUs must have stopped (KVM maps it otherwise)."""
        if not self._base:
            return
        base, self._base = self._base, 0
        self.regions = []  # new accesses refuse from here on
        if native()[1].vmm_discard_guest_ram(base, self.size) == 0:
            self._reserved = base
        # else: the RAM stays mapped (and leaks) rather than risk a fault

    def __del__(self):
        if getattr(self, "_reserved", 0):
            try:
                native()[1].vmm_unmap(self._reserved, self.size)
            except Exception:  # interpreter shutdown
                pass
            self._reserved = 0

    @property
    def closed(self) -> bool:
        """True once close() released the RAM."""
        return not self._base

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def write_sparse(self, fd: int, hasher=None) -> int:
        """Writes all of RAM (host layout: offset = gpa below the MMIO gap, then the RAM
        above it) to `fd` as a sparse file of `size` bytes: zero pages are holes. Feeds
        `hasher` (hashlib-like) each run of non-zero pages (file_digest checks it).
        Returns the bytes written. The vCPUs must be parked."""
        import os

        if not self._base:
            raise GuestMemoryClosed("guest memory is closed: nothing to save")
        ffi, lib = native()
        os.ftruncate(fd, self.size)
        buf = ffi.new("uint8_t[]", SAVE_CHUNK)

        def chunk(off, n):
            lib.vmm_copy_from(buf, self._base + off, n)
            return ffi.buffer(buf, n)

        written = 0
        for off, run in nonzero_runs(chunk, self.size):
            os.pwrite(fd, run, off)
            if hasher is not None:
                hasher.update(off.to_bytes(8, "little"))
                hasher.update(run)
            written += len(run)
        return written

    # -- bounds -----------------------------------------------------------------
    def _ranges_text(self) -> str:
        return ", ".join(f"[{g:#x}, {g + s:#x})" for g, s, _ in self.regions) or "none (closed)"

    def contains(self, gpa: int, length: int = 1) -> bool:
        """True when [gpa, gpa+length) lies inside one RAM region."""
        if not isinstance(gpa, int) or not isinstance(length, int) or gpa < 0 or length < 0:
            return False
        for g, s, _ in self.regions:
            if g <= gpa and gpa + length <= g + s:
                return True
        return False

    def host_address(self, gpa: int, length: int = 1) -> int:
        """Host address of guest-physical gpa, when all of [gpa, gpa+length) is RAM of one
        range; GuestMemoryError naming gpa, length and the RAM ranges otherwise."""
        if not isinstance(gpa, int) or not isinstance(length, int):
            raise GuestMemoryError(f"guest address {gpa!r} / length {length!r} must be integers")
        if gpa >= 0 and length >= 0:
            for g, s, host in self.regions:
                if g <= gpa and gpa + length <= g + s:
                    return host + (gpa - g)
        if not self._base:
            raise GuestMemoryClosed(f"guest-physical {gpa:#x}: guest memory is closed "
                                    "(released when the machine stopped)")
        raise GuestMemoryError(
            f"guest-physical range {gpa:#x}+{length:#x} is not inside guest RAM "
            f"(RAM: {self._ranges_text()})"
        )

    # -- bytes ------------------------------------------------------------------
    def read(self, gpa: int, n: int) -> bytes:
        """n bytes at gpa (GuestMemoryError when any is outside RAM)."""
        ffi, lib = native()
        addr = self.host_address(gpa, n)
        if n == 0:
            return b""
        buf = ffi.new("uint8_t[]", n)
        lib.vmm_copy_from(buf, addr, n)
        return bytes(ffi.buffer(buf, n))

    def write(self, gpa: int, data) -> None:
        """Copy data to gpa (GuestMemoryError when any byte is outside RAM)."""
        ffi, lib = native()
        data = bytes(data)
        addr = self.host_address(gpa, len(data))
        if data:
            lib.vmm_copy_to(addr, ffi.from_buffer(data), len(data))

    # -- width-exact scalars ----------------------------------------------------
    def _check_value(self, value: int, width: int) -> None:
        if not isinstance(value, int) or not 0 <= value <= _WIDTH_MAX[width]:
            raise GuestMemoryError(f"value {value!r} does not fit in u{8 * width}")

    def read_u8(self, gpa: int) -> int:
        """The byte at gpa (one load)."""
        return native()[1].vmm_load_u8(self.host_address(gpa, 1))

    def read_u16(self, gpa: int) -> int:
        """The little-endian u16 at gpa (one load when aligned)."""
        return native()[1].vmm_load_u16(self.host_address(gpa, 2))

    def read_u32(self, gpa: int) -> int:
        """The little-endian u32 at gpa (one load when aligned)."""
        return native()[1].vmm_load_u32(self.host_address(gpa, 4))

    def read_u64(self, gpa: int) -> int:
        """The little-endian u64 at gpa (one load when aligned)."""
        return native()[1].vmm_load_u64(self.host_address(gpa, 8))

    def write_u8(self, gpa: int, value: int) -> None:
        """Store one byte at gpa."""
        self._check_value(value, 1)
        native()[1].vmm_store_u8(self.host_address(gpa, 1), value)

    def write_u16(self, gpa: int, value: int) -> None:
        """Store a u16 at gpa (one store when aligned)."""
        self._check_value(value, 2)
        native()[1].vmm_store_u16(self.host_address(gpa, 2), value)

    def write_u32(self, gpa: int, value: int) -> None:
        """Store a u32 at gpa (one store when aligned)."""
        self._check_value(value, 4)
        native()[1].vmm_store_u32(self.host_address(gpa, 4), value)

    def write_u64(self, gpa: int, value: int) -> None:
        """Store a u64 at gpa (one store when aligned)."""
        self._check_value(value, 8)
        native()[1].vmm_store_u64(self.host_address(gpa, 8), value)

    def fetch_or_u32(self, gpa: int, mask: int) -> int:
        """Atomic OR (lock or); returns the old value. Needs 4-byte alignment: a
        misaligned OR cannot be made atomic against a running guest."""
        self._check_value(mask, 4)
        addr = self.host_address(gpa, 4)
        if gpa % 4 or addr % 4:
            raise GuestMemoryError(f"atomic fetch_or_u32 at {gpa:#x} needs 4-byte alignment")
        return native()[1].vmm_fetch_or_u32(addr, mask)

    def release_fence(self) -> None:
        """A release fence: earlier stores are visible before later ones."""
        native()[1].vmm_release_fence()

    # -- packed plans (ffi/plan.c; built by vmm/ops/plan.py) ------------------------
    @staticmethod
    def plan_supported() -> bool:
        """Whether the C core has vmm_plan_apply (a vmm._native built before it has not)."""
        return hasattr(native()[1], "vmm_plan_apply")

    def apply_plan(self, entries, n: int) -> None:
        """Applies ``n`` packed entries (cffi ``struct vmm_plan_entry[]``) in order, in
        one call. Their host addresses must come from this memory's host_address() for
        the entry's full width, and the batch must be validated: nothing is checked
        per entry here."""
        if not self.regions:
            raise GuestMemoryError("guest RAM is unmapped (the VM ended): plan not applied")
        done = native()[1].vmm_plan_apply(entries, n)
        if done != n:
            raise GuestMemoryError(f"plan entry {done} has an unknown kind or width; "
                                   f"entries 0..{done - 1} were applied")
