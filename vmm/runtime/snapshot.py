"""Snapshots of a running machine, and clones that go on from one.

`take(machine, path=None, thaw=True)` freezes the machine, captures everything a guest
needs to go on exactly where it was, and thaws it (or leaves it frozen: thaw=False):
each layer saves its own state (vmm.kvm.vcpu_state / vm_state for KVM's, each device
model's state(), guest RAM written sparse by vmm.kvm.memory). It returns a `Snapshot`:
in memory (RAM in a memfd) or written to `path`, a directory of three owner-only files:

    manifest.json  format version, vmm version, the kernel's identity, the host's CPUID
                   and KVM capabilities it depends on, each file's size and SHA-256
    state.json     the machine's options, the VM's, vCPUs' and devices' state
    memory.raw     guest RAM (host layout), a sparse file: zero pages are holes

`restore(cls, snapshot_or_path, start=True, **options)` builds a new machine of class
`cls` that continues from that point: a new VM whose RAM maps the snapshot's memory
private (copy-on-write: every clone of one snapshot shares each page it did not write),
the irqchip, PIT, vCPU and device state restored in the order KVM needs, the kvm-clock
set to the snapshot's (the guest sees no jump; the TSC MSR is restored, so the TSC goes
on from its value). Everything is checked before any VM is made: the format version,
the files' sizes and checksums, the host's CPUID features and KVM capabilities.

Not carried into a clone: a gdb session (refused at snapshot time: its breakpoints are
bytes in guest RAM), data watches (debug registers the host armed: the clone has none),
request handlers (register them on the clone), the console's past output (the clone's
console starts empty; `Snapshot.console_position` is where the original was).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vmm.errors import VmmError
from vmm.hostio import atomic_write, open_private
from vmm.kvm import vcpu_state, vm_state
from vmm.kvm.memory import GuestMemory, file_digest
from vmm.machine.topology import Topology

FORMAT_VERSION = 1
MANIFEST, STATE, MEMORY = "manifest.json", "state.json", "memory.raw"
# The KVM capabilities a restore uses (by name, KVM_CAP_*), and the CPUID leaves whose
# feature bits the guest may have seen: the restoring host must have every bit set here.
NEEDED_CAPS = ("IRQCHIP", "PIT2", "MP_STATE", "VCPU_EVENTS", "ADJUST_CLOCK", "XSAVE", "XCRS")
# (leaf, subleaf): the registers that are feature bits (eax, ebx, ecx, edx = 0..3).
FEATURE_LEAVES = {(1, 0): (2, 3), (7, 0): (1, 2, 3), (0xD, 1): (0,), (0x80000001, 0): (2, 3)}
MAX_STATE_BYTES = 64 << 20  # state.json is small (KiBs per vCPU); refuse a huge one


class SnapshotError(VmmError):
    """A snapshot cannot be taken or restored (the message says why and what to do)."""


@dataclass
class Snapshot:
    """A machine's state at one instant; RAM in `memory_fd` (a memfd, or the directory's
    memory.raw opened read-only). close() releases the fd (clones keep their mappings)."""

    manifest: dict
    state: dict
    memory_fd: int
    path: Path | None = None
    _closed: bool = field(default=False, repr=False)

    @property
    def memory_size(self) -> int:
        """Guest RAM in bytes."""
        return self.state["machine"]["memory_size"]

    @property
    def console_position(self) -> int:
        """The original's console_position() when the snapshot was taken."""
        return self.state["console_position"]

    def save(self, path) -> Path:
        """Writes this in-memory snapshot to directory `path` (made if missing, owner-only)."""
        path = Path(path)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open_private(path / MEMORY) as out:
            os.ftruncate(out.fileno(), 0)
            h = hashlib.sha256()
            _copy_sparse(self.memory_fd, out.fileno(), self.memory_size, h)
        _write_manifest_and_state(path, self.manifest, self.state, h.hexdigest())
        return path

    def close(self) -> None:
        """Closes the RAM fd; machines restored from it keep their own mappings."""
        if not self._closed:
            self._closed = True
            os.close(self.memory_fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @classmethod
    def load(cls, path, verify_memory: bool = True) -> "Snapshot":
        """Reads and checks snapshot directory `path`; SnapshotError naming what is
        missing, truncated, corrupt or from another format. `verify_memory=False` skips
        reading all of memory.raw for its checksum (its size is still checked)."""
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise SnapshotError(f"{path} is not a snapshot: no {MANIFEST} (take one with "
                                "m.snapshot(path))") from None
        except (OSError, ValueError) as e:
            raise SnapshotError(f"{path / MANIFEST} is unreadable or corrupt: {e}") from None
        version = manifest.get("format") if isinstance(manifest, dict) else None
        if version != FORMAT_VERSION:
            raise SnapshotError(f"{path} is snapshot format {version!r}; this vmm reads format "
                                f"{FORMAT_VERSION} only: take the snapshot again with this vmm")
        files = manifest.get("files", {})
        for name in (STATE, MEMORY):
            want = files.get(name, {})
            try:
                size = (path / name).stat().st_size
            except FileNotFoundError:
                raise SnapshotError(f"{path} lacks {name}: the snapshot is incomplete") from None
            if size != want.get("size"):
                raise SnapshotError(f"{path / name} is {size} bytes, the manifest says "
                                    f"{want.get('size')}: truncated or replaced")
        if files[STATE]["size"] > MAX_STATE_BYTES:
            raise SnapshotError(f"{path / STATE} is larger than {MAX_STATE_BYTES} bytes")
        raw = (path / STATE).read_bytes()
        if hashlib.sha256(raw).hexdigest() != files[STATE].get("sha256"):
            raise SnapshotError(f"{path / STATE} does not match its checksum: corrupt")
        fd = os.open(path / MEMORY, os.O_RDONLY | os.O_CLOEXEC)
        try:
            state = json.loads(raw)
            if verify_memory:
                h = hashlib.sha256()
                file_digest(fd, state["machine"]["memory_size"], h)
                if h.hexdigest() != files[MEMORY].get("sha256"):
                    raise SnapshotError(f"{path / MEMORY} does not match its checksum: corrupt")
        except BaseException:
            os.close(fd)
            raise
        return cls(manifest, state, fd, path)


# --- host compatibility -------------------------------------------------------------------
def host_profile(kvm) -> dict:
    """What a snapshot depends on of this host: KVM capabilities, CPUID feature bits of
    KVM_GET_SUPPORTED_CPUID, the TSC frequency."""
    caps = {name: kvm.check_extension(kvm.capability_number(name)) for name in NEEDED_CAPS}
    cpuid = kvm.supported_cpuid()
    leaves = {}
    for i in range(cpuid.nent):
        e = cpuid.entries[i]
        if (e.function, e.index) in FEATURE_LEAVES:
            regs = [e.eax, e.ebx, e.ecx, e.edx]
            leaves[f"{e.function:#x}.{e.index}"] = [
                regs[i] if i in FEATURE_LEAVES[(e.function, e.index)] else 0 for i in range(4)]
    return {"caps": caps, "cpuid": leaves}


def check_host(profile: dict, kvm) -> None:
    """SnapshotError naming each capability or CPUID bit the snapshot's host had and this
    one lacks (nothing is made before)."""
    here = host_profile(kvm)
    problems = [f"KVM_CAP_{name}" for name, value in profile.get("caps", {}).items()
                if value > 0 and here["caps"].get(name, 0) <= 0]
    for leaf, regs in profile.get("cpuid", {}).items():
        mine = here["cpuid"].get(leaf, [0, 0, 0, 0])
        for reg, want, have in zip("abcd", regs, mine):
            if want & ~have:
                problems.append(f"CPUID {leaf} e{reg}x bits {want & ~have:#x}")
    if problems:
        raise SnapshotError("this host lacks what the snapshot's guest was given: "
                            + ", ".join(problems) + ". Restore it on a host like the one that "
                            "took it, or take a new snapshot here")


# --- taking ---------------------------------------------------------------------------------
def _vmm_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("vmm")
    except metadata.PackageNotFoundError:
        return "unknown"


def kernel_identity(image: bytes | str | None) -> dict:
    """The kernel's GNU build id (its ELF note, when the image holds one uncompressed)
    and the image's SHA-256; `image` is its bytes or the path of the file booted."""
    if not image:
        return {}
    note = b"\x04\x00\x00\x00\x14\x00\x00\x00\x03\x00\x00\x00GNU\x00"
    h, build_id, tail = hashlib.sha256(), None, b""
    chunks = [image] if isinstance(image, (bytes, bytearray)) else _chunks(image)
    for chunk in chunks:
        h.update(chunk)
        if build_id is None:  # the note may straddle two chunks: 35 bytes carried over
            window = tail + chunk
            at = window.find(note)
            if 0 <= at and at + 36 <= len(window):
                build_id = window[at + 16:at + 36].hex()
            tail = window[-35:]
    return {"build_id": build_id, "sha256": h.hexdigest()}


def _chunks(path: str, size: int = 1 << 22):
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


def _devices(machine) -> dict:
    from vmm.machine import layout as L

    bus = machine.port_bus
    out = {"com1": machine.serial.state(), "com2": machine.request_serial.state(),
           "i8042": bus.find(L.I8042_COMMAND_PORT)[0].state(),
           "exit_port": bus.find(L.EXIT_PORT)[0].state(), "report_port": machine.report_port.state()}
    if machine.acpi:
        out["acpi_pm"] = bus.find(L.ACPI_PM1_CNT_PORT)[0].state()
    assembler = machine.requests._assembler  # a request line the guest has half written
    out["request_partial"] = bytes(assembler._buf).hex()
    return out


def _restore_devices(machine, devices: dict) -> None:
    from vmm.machine import layout as L

    bus = machine.port_bus
    machine.serial.restore(devices["com1"])
    machine.vm.set_serial_fast(machine.serial.fast_path)
    machine.request_serial.restore(devices["com2"])
    bus.find(L.I8042_COMMAND_PORT)[0].restore(devices["i8042"])
    bus.find(L.EXIT_PORT)[0].restore(devices["exit_port"])
    machine.report_port.restore(devices["report_port"])
    if machine.acpi and "acpi_pm" in devices:
        bus.find(L.ACPI_PM1_CNT_PORT)[0].restore(devices["acpi_pm"])
    partial = bytes.fromhex(devices.get("request_partial", ""))
    if partial:
        machine.requests._assembler.feed(partial)


def _machine_options(machine) -> dict:
    kernel = machine.kernel
    opts = {"kernel": str(kernel) if isinstance(kernel, (str, os.PathLike)) else None,
            "cpus": machine.cpus, "memory_size": machine.memory_size,
            "cmdline": machine.requested_cmdline, "acpi": machine.acpi,
            "pvm_assists": machine.pvm_assists, "entry": machine.entry,
            "kernel_end": machine.kernel_end, "is_linux": machine.is_linux,
            "composed_cmdline": machine.cmdline,
            # the clone's CPUID, ACPI tables and memory slots must be the original's
            "topology": asdict(machine.topology)}
    vmlinux = getattr(machine, "_vmlinux_path", None)
    if vmlinux is not None:
        opts["vmlinux"] = str(vmlinux)
    return opts


def _topology(saved: dict) -> Topology:
    """The snapshot's Topology back from its JSON (lists where the dataclass has tuples)."""
    try:
        fields = dict(saved)
        if fields.get("node_memory") is not None:
            fields["node_memory"] = tuple(fields["node_memory"])
        if fields.get("distances") is not None:
            fields["distances"] = tuple(tuple(row) for row in fields["distances"])
        return Topology(**fields)
    except (TypeError, ValueError) as e:
        raise SnapshotError(f"the snapshot's topology {saved!r} is not one vmm can build: "
                            f"corrupt ({e})") from None


def take(machine, path=None, thaw: bool = True) -> Snapshot:
    """Freezes `machine`, captures it, thaws it unless `thaw=False` (then it stays frozen
    until machine.thaw()). With `path` the snapshot is also written there."""
    if getattr(machine.exits, "debugger", None) is not None:
        raise SnapshotError("a debugger (gdb stub) is attached: its breakpoints are bytes in "
                            "guest RAM that a clone would run into; detach it first")
    frozen = machine.freeze()
    ok = False
    try:
        indices = vcpu_state.msr_index_list(machine.kvm)
        vm = vm_state.capture(machine.vm)
        if frozen.clock is not None:  # the clock when the vCPUs stopped, not now
            vm.clock = frozen.clock
        vcpus = [vcpu_state.capture(v, indices) for v in machine.vcpus]
        refused = [r for s in vcpus for r in s.refused]
        state = {"machine": _machine_options(machine), "vm": vm.to_json(),
                 "vcpus": [s.to_json() for s in vcpus], "devices": _devices(machine),
                 "console_position": machine.console_position(), "refused": refused}
        h = hashlib.sha256()
        if path is None:
            fd = os.memfd_create("vmm-snapshot", os.MFD_CLOEXEC)
            machine.memory.write_sparse(fd, h)
        else:  # straight to the file: the snapshot then maps it read-only
            path = Path(path)
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open_private(path / MEMORY) as out:
                os.ftruncate(out.fileno(), 0)
                machine.memory.write_sparse(out.fileno(), h)
            fd = os.open(path / MEMORY, os.O_RDONLY | os.O_CLOEXEC)
        manifest = {"format": FORMAT_VERSION, "vmm_version": _vmm_version(),
                    "kernel": kernel_identity(getattr(machine, "_kernel_bytes", None)),
                    "host": host_profile(machine.kvm), "memory_sha256": h.hexdigest()}
        ok = True
    finally:
        if thaw or not ok:  # a failed capture never leaves the machine frozen
            frozen.__exit__(None, None, None)
    if path is not None:
        _write_manifest_and_state(path, manifest, state, h.hexdigest())
        manifest = json.loads((path / MANIFEST).read_text())
    return Snapshot(manifest, state, fd, path)


def _write_manifest_and_state(path: Path, manifest: dict, state: dict, memory_sha: str) -> None:
    raw = json.dumps(state, sort_keys=True).encode()
    atomic_write(path / STATE, raw, private=True)
    manifest = dict(manifest, files={
        STATE: {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()},
        MEMORY: {"size": state["machine"]["memory_size"], "sha256": memory_sha}})
    atomic_write(path / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True), private=True)


def _copy_sparse(src: int, dst: int, size: int, hasher) -> None:
    from vmm.kvm.memory import nonzero_runs

    os.ftruncate(dst, size)

    def chunk(off, n):
        return os.pread(src, n, off).ljust(n, b"\0")

    for off, run in nonzero_runs(chunk, size):
        os.pwrite(dst, run, off)
        hasher.update(off.to_bytes(8, "little"))
        hasher.update(run)


# --- restoring ------------------------------------------------------------------------------
def restore(cls, snapshot, start: bool = True, verify_memory: bool = True, shell=None,
            **options):
    """A new `cls` machine going on from `snapshot` (a Snapshot or a directory path),
    running unless `start=False` (then parked until .start()). `options` override the
    snapshot's constructor options (console=, timeout=, console_log=...). `shell`: an
    empty machine made ahead by make_shell() for this snapshot and these options
    (vmm.runtime.clone_pool), used instead of making the VM and its vCPUs now."""
    snap = snapshot if isinstance(snapshot, Snapshot) else Snapshot.load(snapshot, verify_memory)
    if snap._closed:
        raise SnapshotError("the snapshot was closed: its memory is gone")
    mo, vm, vcpus = _parsed_state(snap)
    machine = shell if shell is not None else _make_shell(cls, snap, mo, options)
    try:
        machine.memory = GuestMemory(mo["memory_size"], backing_fd=snap.memory_fd)
        machine.memory.register(machine.vm)
        machine._run_step("setup_devices")
        vm_state.apply(machine.vm, vm)
        for v, s in zip(machine.vcpus, vcpus):
            refused = vcpu_state.apply(v, s)
            if refused:
                machine.notes.append(f"restore: vCPU {v.index}: KVM refused MSRs "
                                     + ", ".join(f"{i:#x}" for i in refused))
        _restore_devices(machine, snap.state["devices"])
        machine.snapshot_origin = snap.path or "memory"
    except BaseException:
        machine._teardown()
        raise
    if start:
        machine.start()
    return machine


def make_shell(cls, snap: "Snapshot", **options):
    """The part of a restore that does not need the snapshot's RAM or device state: a
    `cls` machine with its VM, irqchip, PIT and vCPUs (CPUID set; every other register
    comes from the snapshot). Checks the snapshot and the host first."""
    if snap._closed:
        raise SnapshotError("the snapshot was closed: its memory is gone")
    return _make_shell(cls, snap, _parsed_state(snap)[0], options)


def _make_shell(cls, snap: "Snapshot", mo: dict, options: dict):
    from vmm.kvm import Kvm

    with Kvm() as kvm:
        check_host(snap.manifest["host"], kvm)
    kwargs = {"cpus": mo["cpus"], "memory": mo["memory_size"], "cmdline": mo["cmdline"],
              "acpi": mo["acpi"], "pvm_assists": mo["pvm_assists"]}
    if "vmlinux" in mo:
        kwargs["vmlinux"] = mo["vmlinux"]
    if "topology" in mo:
        topo = _topology(mo["topology"])
        kwargs["topology"] = topo
        kwargs["memory"] = dict(enumerate(topo.node_memory or (mo["memory_size"],)))
    kwargs.update(options)
    kernel = kwargs.pop("kernel", mo["kernel"])
    if kernel is None:
        raise SnapshotError("the snapshot's machine was given its kernel as bytes: pass "
                            "kernel= to from_snapshot")
    machine = cls(kernel, **kwargs)
    try:
        machine._run_step("create_vm")
        machine._run_step("setup_irqchip")
        machine.entry, machine.kernel_end = mo["entry"], mo["kernel_end"]
        machine.is_linux, machine.cmdline = mo["is_linux"], mo["composed_cmdline"]
        # RAM is registered after the vCPUs (restore()): KVM takes memory slots at any time.
        machine._run_step("create_vcpus", boot_state=False)  # vcpu_state.apply sets it all
    except BaseException:
        machine._teardown()
        raise
    return machine


def _parsed_state(snap: "Snapshot"):
    """(the machine's options, VmState, [VcpuState]) of a snapshot, or SnapshotError."""
    st = snap.state
    try:
        mo = st["machine"]
        vm = vm_state.VmState.from_json(st["vm"])
        vcpus = [vcpu_state.VcpuState.from_json(v) for v in st["vcpus"]]
        if len(vcpus) != mo["cpus"]:
            raise SnapshotError(f"the snapshot holds {len(vcpus)} vCPU states for {mo['cpus']} CPUs")
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"the snapshot's state is corrupt: {type(e).__name__}: {e}") from None
    if not isinstance(snap.manifest.get("host"), dict):
        raise SnapshotError("the snapshot's manifest does not say what host it needs: corrupt")
    return mo, vm, vcpus
