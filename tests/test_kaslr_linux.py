"""Real kernels that randomize themselves, on the plain path (VMX/SVM): each booted
several times through its own decompressor with KASLR on, as under QEMU.

Kernels: our build (kernels/config/sched_ext.fragment: RELOCATABLE, RANDOMIZE_BASE,
RANDOMIZE_MEMORY) and Debian's prebuilt cloud kernel (its vmlinuz; symbols from its
-dbg package). Every boot: the slide, phys_base and memory bases found and
cross-checked, the scx clock/flag batch, `init_uts_ns` (the release string equals the
vmlinux's), `jiffies` advancing, every CPU's `runqueues.cpu`; across boots the slide
differs at least once; the console shows the TSC frequency told by KVM and kvm-clock.

Slow, and only with hardware virtualization: on a PVM host (our development machines)
guest ring 0 is emulated and vmm boots the vmlinux with nokaslr there. Run them in the
SVM lane: `make test-svm`, or
    python3 scripts/svm_lane.py run -- python3 -m pytest -q -m slow tests/test_kaslr_linux.py -s
Prepare the kernels first, outside the lane (it has no network):
    make kernel-build && make kernel-debian && make -C kernels kernel-debian-dbg
"""

import os
import re
import time
from dataclasses import dataclass, field

import pytest

from vmm import KernelTarget as T, Machine
from vmm.kvm.pvm import is_pvm_host
from vmm.session import INIT_MARKER

pytestmark = [pytest.mark.slow, pytest.mark.kvm]

BOOTS = 3
CPUS = 2
BOOT_TIMEOUT = 300  # 10-20 s measured in the SVM lane
TSC_DETECTED = re.compile(r"tsc: Detected (\d+\.\d{3}) MHz processor")
TSC_FAILURES = ("Fast TSC calibration failed", "could not calculate TSC khz")


def hardware_virtualization() -> bool:
    if not os.path.exists("/dev/kvm") or is_pvm_host():
        return False
    with open("/proc/cpuinfo") as f:
        return re.search(r"\b(vmx|svm)\b", f.read()) is not None


def _require_hardware_virtualization():
    if not hardware_virtualization():
        pytest.skip("needs VMX/SVM: run `make test-svm` (on a PVM host vmm boots the vmlinux "
                    "with nokaslr; there is no KASLR to test)")


def _artifacts(kind):
    from vmm import kernelstore as ks

    if kind == "build":
        wanted = f"build-{ks.DEFAULT_BUILD_VERSION}-{ks.fragment_hash(ks.DEFAULT_FRAGMENT)}"
        art = next((a for a in ks.list_kernels() if a.name == wanted), None)
        if art is None or art.bzimage is None:
            pytest.skip(f"kernel {wanted} is not built: run `make kernel-build`")
        return art
    arts = [a for a in ks.list_kernels() if a.name.startswith("debian-")]
    art = next((a for a in arts if a.system_map is not None and a.bzimage is not None), None)
    if art is None:
        pytest.skip("Debian's kernel with its -dbg symbols is not in the store: run "
                    "`make kernel-debian && make -C kernels kernel-debian-dbg` (needs the mirror)")
    return art


def _vmlinux_release(machine) -> bytes:
    """init_uts_ns.name.release as the vmlinux file initializes it."""
    k = machine.kernel_image
    offset = k.btf.offsetof("struct uts_namespace", "name.release")
    size = k.btf.field("struct uts_namespace", "name.release").size
    raw = k.elf.read_va(k.symbol("init_uts_ns") + offset, size)
    return raw.split(b"\0")[0]


@dataclass
class Boot:
    seconds_to_init: float
    cmdline: str
    layout: object  # vmm.kernel.kaslr.KernelLayout
    layout_text: str
    per_cpu_checked: list
    injection: object  # vmm.session.ScxInjection
    release: bytes
    vmlinux_release: bytes
    jiffies: tuple
    rq_cpus: list
    console: str
    notes: list = field(default_factory=list)


def _boot_once(art, memory) -> Boot:
    m = Machine(kernel=str(art.bzimage), vmlinux=art.vmlinux, system_map=art.system_map,
                cpus=CPUS, memory=memory)
    t0 = time.monotonic()
    m.start()
    try:
        assert m.decompress_in_guest, "the plain path boots a bzImage through its decompressor"
        m.wait_for_console(INIT_MARKER, timeout=BOOT_TIMEOUT)
        seconds = time.monotonic() - t0
        with m.freeze() as snap:
            live = m.live(snap)
            per_cpu = live.check_per_cpu()
            text = live.describe_layout(check_per_cpu=False)
        injection = m.inject_scx_clock()
        release = m.read(T.field("init_uts_ns", "name.release")).split(b"\0")[0]
        j0 = m.read("jiffies", hot=True)
        deadline = time.monotonic() + 60
        while m.read("jiffies", hot=True) == j0 and time.monotonic() < deadline:
            time.sleep(0.1)
        j1 = m.read("jiffies", hot=True)
        rq_cpus = [m.read("runqueues", "cpu", cpu=c) for c in range(CPUS)]
        boot = Boot(seconds, m.cmdline, live.layout, text, per_cpu, injection, release,
                    _vmlinux_release(m), (j0, j1), rq_cpus, m.console_text(), list(m.notes))
    finally:
        m.stop()
    tsc = TSC_DETECTED.search(boot.console)
    clock = re.findall(r"clocksource: Switched to clocksource (\S+)", boot.console)
    print(f"\n{art.name}: 'Run /init' after {boot.seconds_to_init:.1f} s; {boot.layout_text}; "
          f"{tsc.group(0) if tsc else 'no tsc: Detected line'}; clocksources {clock}")
    return boot


@pytest.fixture(scope="module", params=["build", "debian"])
def boots(request):
    _require_hardware_virtualization()
    art = _artifacts(request.param)
    memory = "1G" if request.param == "debian" else "512M"
    result = [_boot_once(art, memory) for _ in range(BOOTS)]
    slides = [b.layout.slide for b in result]
    print(f"\n{art.name}: {BOOTS} boots, slides {[hex(s) for s in slides]}, image gpas "
          f"{[hex(b.layout.image_gpa) for b in result]}, page_offset_base "
          f"{[hex(b.layout.page_offset_base) for b in result]}, to 'Run /init' "
          f"{[round(b.seconds_to_init, 1) for b in result]} s")
    return result


def test_kaslr_on_by_default_and_slides_differ(boots):
    for b in boots:
        assert "nokaslr" not in b.cmdline.split()
        assert b.layout.slide_source == "lstar"
        assert b.layout.image_randomized
    assert len({b.layout.slide for b in boots}) > 1, [hex(b.layout.slide) for b in boots]


def test_layout_cross_checked(boots):
    for b in boots:
        assert {"linux_banner", "phys_base = page walk", "direct map = image map"} <= set(b.layout.checks), b.layout_text
        assert b.per_cpu_checked == list(range(CPUS))


def test_memory_bases_randomized(boots):
    # RANDOMIZE_MEMORY: page_offset_base moves on (nearly) every boot.
    assert any(b.layout.memory_randomized for b in boots), [b.layout_text for b in boots]


def test_scx_clock_and_flag_batch_every_boot(boots):
    for b in boots:
        assert b.injection.ok, b.injection.describe()
        assert [r.cpu for r in b.injection.rows] == list(range(CPUS))


def test_init_uts_ns_release_is_the_vmlinux_one(boots):
    for b in boots:
        assert b.release and b.release == b.vmlinux_release


def test_jiffies_advance(boots):
    for b in boots:
        assert b.jiffies[1] > b.jiffies[0]


def test_every_runqueue_knows_its_cpu(boots):
    for b in boots:
        assert b.rq_cpus == list(range(CPUS))


def test_tsc_frequency_known_and_kvm_clock(boots):
    for b in boots:
        assert TSC_DETECTED.search(b.console), b.console[-3000:]
        assert "kvm-clock" in b.console
        for failure in TSC_FAILURES:
            assert failure not in b.console
        assert any(n.startswith("paravirt CPUID") for n in b.notes)


def test_no_keyboard_controller_probe_wait(boots):
    """Our i8042 has only the reset line; its status says "no controller" so that a kernel
    probing the ports directly (ours: no ACPI PNP) gives up at once instead of polling
    for a control register value 10,000 times (half a second of boot on hardware)."""
    for b in boots:
        assert "Can't read CTR" not in b.console, b.console[-3000:]
        if "i8042" in b.console:
            assert "i8042: No controller found" in b.console or "No PS/2 controller" in b.console
