"""Thin safe wrappers over the KVM ioctls: one method per ioctl, errno -> KvmIoctlError.

Policy (what to set up, in which order) lives above, in vmm.machine. Structures are the
cffi ones from <linux/kvm.h> (`struct kvm_regs *` etc.), so fields read like the kernel's.
"""

from __future__ import annotations

import errno
import os
import threading

from vmm.errors import (CapabilityMissing, KvmIoctlError, KvmPermissionError, KvmUnavailable,
                        InvalidValue, VmClosed)
from vmm.kvm.native import check, ioctl, ioctl_int, native

KVM_API_VERSION = 12
DEFAULT_KVM_PATH = "/dev/kvm"
MAX_CPUID_ENTRIES = 256
# KVM_GET_MP_STATE's answers on x86 (include/uapi/linux/kvm.h), in words.
MP_STATE_NAMES = {0: "runnable", 1: "waiting for INIT/SIPI", 2: "INIT received",
                  3: "halted", 4: "SIPI received"}

# Not in the C core's cdef (ffi/build_native.py): called through its generic
# vmm_ioctl_int with the number from <linux/kvm.h>.
KVM_GET_TSC_KHZ = 0xAEA3  # _IO(KVMIO, 0xa3)
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_TSC_DEADLINE_TIMER = 72


def permission_advice(path: str, mode: int | None = None, uid: int | None = None,
                      gid: int | None = None, group_name: str | None = None,
                      my_groups=None, my_uid: int | None = None) -> str:
    """What would let this user open `path`, from the device's actual owner and mode
    (arguments default to os.stat and the current process; tests pass them)."""
    import grp
    import pwd
    import stat as stat_

    if mode is None:
        try:
            st = os.stat(path)
        except OSError:
            return "Run as root, or ask the host's administrator for access to it."
        mode, uid, gid = st.st_mode, st.st_uid, st.st_gid
    if group_name is None:
        try:
            group_name = grp.getgrgid(gid).gr_name
        except KeyError:
            group_name = str(gid)
    try:
        owner = pwd.getpwuid(uid).pw_name
    except KeyError:
        owner = str(uid)
    my_groups = set(os.getgroups() if my_groups is None else my_groups)
    my_uid = os.getuid() if my_uid is None else my_uid
    perms = stat_.S_IMODE(mode)
    where = f"{path} is mode {perms:04o}, owned by {owner}:{group_name}"
    rw = 0o6
    if (perms >> 3) & rw == rw and gid != 0:
        if gid in my_groups:
            return (f"{where}; you are in group {group_name} already, so the mode allows it: "
                    "an ACL, a security module (SELinux/AppArmor) or a container's device "
                    "cgroup refuses it. Ask the host's administrator, or run as root")
        return (f"{where}: join that group (sudo usermod -aG {group_name} $USER, then log "
                "in again; `newgrp " + group_name + "` for this shell only) or run as root")
    if perms & rw == rw or (uid == my_uid and (perms >> 6) & rw == rw):
        return (f"{where}, which allows it: an ACL, a security module (SELinux/AppArmor) or "
                "a container's device cgroup refuses it. Ask the host's administrator, or "
                "run as root")
    return (f"{where}: no group grants access, so joining one does not help. Run as root, "
            "or give the device to a group: a udev rule such as "
            '`KERNEL=="kvm", GROUP="kvm", MODE="0660"` in /etc/udev/rules.d/65-kvm.rules '
            f"(then sudo udevadm trigger), or `sudo chgrp kvm {path} && sudo chmod 0660 "
            f"{path}` until the next boot, then join that group")


_SUPPORTED_CPUID: tuple[int, bytes] | None = None  # (nent, entries) from KVM_GET_SUPPORTED_CPUID

class Kvm:
    """An open /dev/kvm (system fd)."""

    def __init__(self, path: str = DEFAULT_KVM_PATH):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                f"{path} does not exist: this host has no KVM. Load the module "
                "(modprobe kvm_intel or kvm_amd), enable virtualization in the firmware, "
                "or run on a host/VM with nested virtualization"
            ) from None
        except PermissionError:
            raise KvmPermissionError(f"cannot open {path}: permission denied. "
                                     + permission_advice(path)) from None
        except OSError as e:
            raise KvmUnavailable(f"cannot open {path}: {e.strerror} (errno {e.errno})") from None
        try:
            self.api_version = ioctl_int(self.fd, "KVM_GET_API_VERSION", 0, path)
            if self.api_version != KVM_API_VERSION:
                raise KvmUnavailable(
                    f"{path} speaks KVM API {self.api_version}, this VMM needs {KVM_API_VERSION}"
                )
            self.vcpu_mmap_size = ioctl_int(self.fd, "KVM_GET_VCPU_MMAP_SIZE", 0, path)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    def close(self) -> None:
        """Close /dev/kvm (VMs made from it keep their own fds)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when absent, else a capability-specific positive value."""
        return ioctl_int(self.fd, "KVM_CHECK_EXTENSION", cap)

    @staticmethod
    def capability_number(cap) -> int:
        """"KVM_CAP_IRQCHIP", "IRQCHIP" or a number -> the number; CapabilityMissing
        when the name is unknown."""
        if isinstance(cap, int):
            return cap
        _, lib = native()
        name = cap if cap.startswith("KVM_CAP_") else "KVM_CAP_" + cap
        try:
            return getattr(lib, name)
        except AttributeError:
            raise CapabilityMissing(f"unknown KVM capability name {cap!r}") from None

    def require(self, cap) -> int:
        """The capability's value; CapabilityMissing naming it when the host lacks it."""
        value = self.check_extension(self.capability_number(cap))
        if value <= 0:
            if isinstance(cap, int):
                name = f"KVM capability {cap}"
            else:
                name = cap if cap.startswith("KVM_CAP_") else "KVM_CAP_" + cap
            raise CapabilityMissing(f"host KVM lacks {name} (needed by this VMM)")
        return value

    def supported_cpuid(self):
        """KVM_GET_SUPPORTED_CPUID as a cffi `struct kvm_cpuid2 *` (nent = entries used),
        a fresh copy each call. The host's answer does not change while KVM is loaded, so
        it is asked once per process (a clone's restore asked twice: ~10% of it on PVM)."""
        ffi, _ = native()
        global _SUPPORTED_CPUID
        if _SUPPORTED_CPUID is None:
            n = MAX_CPUID_ENTRIES
            while True:
                cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
                try:
                    ioctl(self.fd, "KVM_GET_SUPPORTED_CPUID", cpuid)
                    break
                except KvmIoctlError as e:
                    if e.errno != errno.E2BIG or n >= 4096:
                        raise
                    n *= 2
            entries = bytes(ffi.buffer(cpuid.entries, cpuid.nent * ffi.sizeof("struct kvm_cpuid_entry2")))
            _SUPPORTED_CPUID = (cpuid.nent, entries)
        nent, entries = _SUPPORTED_CPUID
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": nent, "entries": nent})
        ffi.memmove(cpuid.entries, entries, len(entries))
        return cpuid

    def create_vm(self) -> "Vm":
        """A new VM (KVM_CREATE_VM) with its C control block."""
        return Vm(self, ioctl_int(self.fd, "KVM_CREATE_VM", 0))


class Vm:
    """A VM fd plus its C control block (`native`, struct vmm_vm *) for the run loop."""

    def __init__(self, kvm: Kvm, fd: int):
        ffi, lib = native()
        self.kvm = kvm
        self.fd = fd
        raw = lib.vmm_vm_new(fd)
        if raw == ffi.NULL:
            os.close(fd)
            raise KvmIoctlError("vmm_vm_new", errno.ENOMEM, "cannot allocate the VM control block")
        # The C block (and the vCPU blocks and kvm_run pages it owns) is freed only when
        # the last Python object holding this pointer is gone, never by close(): the
        # freeze coordinator, console pump and vCPU threads keep it, so a thaw or a kick
        # after stop() touches live memory (and does nothing) instead of freed memory.
        self.native = ffi.gc(raw, lib.vmm_vm_free)
        self.vcpus: list[Vcpu] = []
        # Held by close() and by whoever must not see the fds closed under it (the freeze
        # coordinator's ioctls): close() waits for them, they see `closed` afterwards.
        self.lock = threading.RLock()

    @property
    def closed(self) -> bool:
        """True once close() freed the VM's fds."""
        return self.fd < 0

    def require_open(self, what: str) -> None:
        """Raise VmClosed naming `what` when the VM was already stopped and freed."""
        if self.fd < 0:
            raise VmClosed(f"{what}: the VM was stopped and its resources freed")

    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: three pages KVM may use (VMX real-mode emulation)."""
        ioctl_int(self.fd, "KVM_SET_TSS_ADDR", addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: one page KVM may use for its identity map."""
        ffi, _ = native()
        ioctl(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", ffi.new("uint64_t *", addr))

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: the in-kernel PIC, IOAPIC and local APICs."""
        ioctl_int(self.fd, "KVM_CREATE_IRQCHIP", 0)

    def create_pit2(self, flags: int = 0) -> None:
        """KVM_CREATE_PIT2: the in-kernel i8254 timer."""
        ffi, _ = native()
        cfg = ffi.new("struct kvm_pit_config *")
        cfg.flags = flags
        ioctl(self.fd, "KVM_CREATE_PIT2", cfg)

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int,
                               flags: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION: map host_addr's `size` bytes at guest-physical gpa."""
        ffi, _ = native()
        r = ffi.new("struct kvm_userspace_memory_region *")
        r.slot, r.flags = slot, flags
        r.guest_phys_addr, r.memory_size, r.userspace_addr = gpa, size, host_addr
        ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", r,
              f"slot {slot} gpa {gpa:#x} size {size:#x}")

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE: raise (level 1) or lower (0) interrupt line `irq`."""
        ffi, _ = native()
        lv = ffi.new("struct kvm_irq_level *")
        lv.irq, lv.level = irq, int(bool(level))
        ioctl(self.fd, "KVM_IRQ_LINE", lv, f"irq {irq}")

    def get_clock(self) -> tuple[int, int]:
        """KVM_GET_CLOCK: (kvmclock nanoseconds, flags)."""
        ffi, _ = native()
        c = ffi.new("struct kvm_clock_data *")
        ioctl(self.fd, "KVM_GET_CLOCK", c)
        return c.clock, c.flags

    def set_clock(self, clock: int) -> None:
        """KVM_SET_CLOCK: set the guest's kvmclock to `clock` nanoseconds."""
        ffi, _ = native()
        c = ffi.new("struct kvm_clock_data *")
        c.clock = clock
        ioctl(self.fd, "KVM_SET_CLOCK", c)

    def create_vcpu(self, index: int, apic_id: int | None = None) -> "Vcpu":
        """vCPU `index` (KVM_CREATE_VCPU, its kvm_run page mapped and its C block made).
        KVM's vcpu_id is the vCPU's initial (x)APIC ID: `apic_id` when the topology's ids
        have gaps (bit fields of counts that are not powers of two), else `index`."""
        ffi, lib = native()
        vcpu_id = index if apic_id is None else apic_id
        fd = ioctl_int(self.fd, "KVM_CREATE_VCPU", vcpu_id, f"vCPU {index} (APIC ID {vcpu_id})")
        err = ffi.new("int *")
        nat = lib.vmm_vcpu_new(self.native, fd, index, self.kvm.vcpu_mmap_size, err)
        if nat == ffi.NULL:
            os.close(fd)
            raise KvmIoctlError("mmap(kvm_run)", err[0], f"vCPU {index}")
        vcpu = Vcpu(self, index, fd, nat)
        self.vcpus.append(vcpu)
        return vcpu

    # COM1 fast path (the 16550 device flips it; see vmm/machine/devices/serial.py).
    def set_serial_fast(self, enabled: bool) -> None:
        """Let the C run loop complete COM1 transmits itself (True) or hand them to Python."""
        native()[1].vmm_serial_set_fast(self.native, 1 if enabled else 0)

    # Unclaimed ports (see struct vmm_vm.port_filter): the machine claims its devices'
    # ranges, then lets C complete accesses to every other port like an empty ISA bus.
    def claim_ports(self, start: int, count: int) -> None:
        """Claim [start, start+count) for Python's devices: the C loop hands those exits up."""
        native()[1].vmm_claim_ports(self.native, start, count)

    def set_port_filter(self, enabled: bool) -> None:
        """On: C completes accesses to unclaimed ports itself (reads all ones, writes dropped,
        counted)."""
        native()[1].vmm_set_port_filter(self.native, 1 if enabled else 0)

    def port_misses(self) -> dict[int, int]:
        """{port: accesses} to unclaimed ports that C completed."""
        ffi, lib = native()
        ports, counts = ffi.new("uint32_t[65536]"), ffi.new("uint32_t[65536]")
        n = lib.vmm_port_misses_all(self.native, ports, counts, 65536)
        return {ports[i]: counts[i] for i in range(n)}

    def close(self) -> None:
        """Closes vCPU fds and the VM fd. vCPU threads should have ended (runtime joins
        them); a thread still inside the C loop keeps its vCPU fd open. The C control
        blocks stay allocated while anything refers to them (see __init__); every
        ioctl after close() raises (a closed fd), never touches freed memory."""
        with self.lock:
            if self.fd < 0:
                return
            _, lib = native()
            lib.vmm_request_stop(self.native)  # a no-op when every loop has returned
            threads_live = self.native.live > 0
            for v in self.vcpus:
                v.close(keep_fd=threads_live)
            self.vcpus.clear()
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Vcpu:
    """A vCPU fd; `run` is its mapped `struct kvm_run *`, `native` its C loop state."""

    def __init__(self, vm: Vm, index: int, fd: int, nat):
        self.vm = vm
        self.index = index
        self.fd = fd
        self.native = nat  # owned by vm.native's block: alive as long as this Vcpu
        self.run = nat.run
        self._vm_native = vm.native

    def _get(self, ctype: str, name: str):
        ffi, _ = native()
        s = ffi.new(ctype)
        ioctl(self.fd, name, s, f"vCPU {self.index}")
        return s

    def _set(self, name: str, value) -> None:
        ioctl(self.fd, name, value, f"vCPU {self.index}")

    def get_regs(self):
        """KVM_GET_REGS: the general registers (cffi struct kvm_regs *)."""
        return self._get("struct kvm_regs *", "KVM_GET_REGS")

    def set_regs(self, regs) -> None:
        """KVM_SET_REGS."""
        self._set("KVM_SET_REGS", regs)

    def get_sregs(self):
        """KVM_GET_SREGS: segment, control and descriptor-table registers (struct kvm_sregs *)."""
        return self._get("struct kvm_sregs *", "KVM_GET_SREGS")

    def set_sregs(self, sregs) -> None:
        """KVM_SET_SREGS."""
        self._set("KVM_SET_SREGS", sregs)

    def get_fpu(self):
        """KVM_GET_FPU: x87/SSE registers (struct kvm_fpu *; MXCSR is in get_xsave())."""
        return self._get("struct kvm_fpu *", "KVM_GET_FPU")

    def set_fpu(self, fpu) -> None:
        """KVM_SET_FPU."""
        self._set("KVM_SET_FPU", fpu)

    def get_xsave(self) -> bytearray:
        """The 4 KiB XSAVE area (KVM_GET_XSAVE); its legacy FXSAVE region holds MXCSR,
        which KVM_GET_FPU/KVM_SET_FPU ignore."""
        ffi, _ = native()
        xsave = self._get("struct kvm_xsave *", "KVM_GET_XSAVE")  # owns the memory: keep it
        return bytearray(ffi.buffer(xsave.region))  # while .region (a view into it) is copied

    def set_xsave(self, data: bytes) -> None:
        """KVM_SET_XSAVE from a whole XSAVE area (InvalidValue when the size differs)."""
        ffi, _ = native()
        xsave = ffi.new("struct kvm_xsave *")
        if len(data) != ffi.sizeof(xsave.region):
            raise InvalidValue(f"set_xsave: the XSAVE area is {ffi.sizeof(xsave.region)} bytes, "
                               f"not {len(data)}")
        ffi.memmove(xsave.region, bytes(data), len(data))
        self._set("KVM_SET_XSAVE", xsave)

    def get_vcpu_events(self):
        """KVM_GET_VCPU_EVENTS: pending exception, interrupt and NMI state."""
        return self._get("struct kvm_vcpu_events *", "KVM_GET_VCPU_EVENTS")

    def set_vcpu_events(self, events) -> None:
        """KVM_SET_VCPU_EVENTS."""
        self._set("KVM_SET_VCPU_EVENTS", events)

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE: the vCPU's run state (KVM_MP_STATE_*)."""
        return self._get("struct kvm_mp_state *", "KVM_GET_MP_STATE").mp_state

    def set_mp_state(self, state: int) -> None:
        """KVM_SET_MP_STATE."""
        ffi, _ = native()
        s = ffi.new("struct kvm_mp_state *")
        s.mp_state = state
        self._set("KVM_SET_MP_STATE", s)

    def set_cpuid2(self, cpuid) -> None:
        """KVM_SET_CPUID2: the CPUID leaves this vCPU reports."""
        self._set("KVM_SET_CPUID2", cpuid)

    def get_msrs(self, indices) -> dict[int, int]:
        """{index: value}; KvmIoctlError naming the first MSR KVM refused."""
        ffi, _ = native()
        indices = list(indices)
        m = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for i, idx in enumerate(indices):
            m.entries[i].index = idx
        got = ioctl(self.fd, "KVM_GET_MSRS", m, f"vCPU {self.index}")
        if got < len(indices):
            raise KvmIoctlError("KVM_GET_MSRS", errno.EINVAL,
                                f"vCPU {self.index}: MSR {indices[got]:#x} not readable")
        return {m.entries[i].index: m.entries[i].data for i in range(len(indices))}

    def set_msrs(self, values: dict[int, int]) -> None:
        """KVM_SET_MSRS from {index: value}; KvmIoctlError naming the first MSR KVM refused."""
        ffi, _ = native()
        items = list(values.items())
        m = ffi.new("struct kvm_msrs *", {"nmsrs": len(items), "entries": len(items)})
        for i, (idx, val) in enumerate(items):
            m.entries[i].index, m.entries[i].data = idx, val
        done = ioctl(self.fd, "KVM_SET_MSRS", m, f"vCPU {self.index}")
        if done < len(items):
            raise KvmIoctlError("KVM_SET_MSRS", errno.EINVAL,
                                f"vCPU {self.index}: MSR {items[done][0]:#x} not writable")

    def get_tsc_khz(self) -> int | None:
        """KVM_GET_TSC_KHZ: the frequency of this vCPU's TSC in kHz; None when the host
        cannot say (no such ioctl, or no stable TSC frequency known to KVM)."""
        _, lib = native()
        r = lib.vmm_ioctl_int(self.fd, KVM_GET_TSC_KHZ, 0)
        if r in (-errno.ENOTTY, -errno.EINVAL, -errno.EIO):
            return None
        return check("KVM_GET_TSC_KHZ", r, f"vCPU {self.index}") or None

    def set_guest_debug(self, control: int = 0, debugreg=None) -> None:
        """KVM_SET_GUEST_DEBUG: `control` is KVM_GUESTDBG_* bits (0 turns debugging off:
        the guest's own #BP/#DB and debug registers work again); `debugreg` up to 8
        values, DR0-DR3, -, -, -, DR7 (used with KVM_GUESTDBG_USE_HW_BP). The vCPU must
        not be inside KVM_RUN (call it while frozen, or before the first run)."""
        ffi, _ = native()
        dbg = ffi.new("struct kvm_guest_debug *")
        dbg.control = control
        regs = list(debugreg or ())
        if len(regs) > 8:
            raise InvalidValue(f"set_guest_debug: 8 debug registers at most, not {len(regs)}")
        for i, value in enumerate(regs):
            dbg.arch.debugreg[i] = value
        self._set("KVM_SET_GUEST_DEBUG", dbg)

    def kvmclock_ctrl(self) -> bool:
        """Tells KVM the guest was paused (no soft-lockup warning). False when the guest
        has no kvmclock (EINVAL) or the host lacks the ioctl."""
        _, lib = native()
        r = lib.vmm_ioctl_int(self.fd, lib.KVM_KVMCLOCK_CTRL, 0)
        if r in (-errno.EINVAL, -errno.ENOTTY, -errno.EOPNOTSUPP):
            return False
        check("KVM_KVMCLOCK_CTRL", r, f"vCPU {self.index}")
        return True

    def close(self, keep_fd: bool = False) -> None:
        """Closes the vCPU fd and unmaps its kvm_run page (unless its thread still runs:
        keep_fd). The native block is freed with the VM's block (Vm.__init__)."""
        if self.fd < 0 or keep_fd:
            return
        # The kvm_run mapping pins the VM in the kernel: drop it now, the block stays.
        native()[1].vmm_vcpu_release_run(self.native)
        self.run = None
        os.close(self.fd)
        self.fd = -1
