"""drgn and crash as independent oracles on real Linux: one boot of our 7.3 sched_ext
build (2 vCPUs), then, for every CPU, our symbol addresses, per-CPU addresses, page
walks and reads equal drgn's on the live guest; a write targets a drgn object; a
vmcore dumped while frozen is opened by drgn and by crash, which print what vmm reads.

    make kernel-build && python -m pytest tests/test_debug_linux.py -m slow -s
"""

import os
import re
import shutil
import subprocess
import time

import pytest

from vmm import KernelTarget as T, KernelValue as V, Machine, Op
from vmm.kernel.translate import walk
from vmm.session import INIT_MARKER

pytestmark = [pytest.mark.slow, pytest.mark.kvm]  # tests/conftest.py: skips without a usable /dev/kvm

drgn = pytest.importorskip("drgn", reason="drgn not installed (pip install drgn; the test "
                                          "extra has it)")
from drgn.helpers.linux.mm import follow_phys  # noqa: E402
from drgn.helpers.linux.percpu import per_cpu_ptr  # noqa: E402
from drgn.helpers.linux.sched import cpu_rq  # noqa: E402

CPUS = 2
BOOT_TIMEOUT = 1500


def _artifacts():
    from vmm import kernelstore as ks

    if os.environ.get("VMM_DEBUG_KERNEL"):  # e.g. a KASLR build (see KASLR below)
        return ks.resolve_kernel(os.environ["VMM_DEBUG_KERNEL"])
    wanted = f"build-{ks.DEFAULT_BUILD_VERSION}-{ks.fragment_hash(ks.DEFAULT_FRAGMENT)}"
    for art in ks.list_kernels():
        if art.name == wanted:
            return art
    pytest.skip(f"kernel {wanted} is not built: run `make kernel-build` (CI does)")


# VMM_DEBUG_KASLR=1: boot the bzImage through its own decompressor without nokaslr, so
# the kernel picks a random slide (hardware virtualization only: on a PVM host the
# decompressor is emulated; run it in the SVM lane). The checks below then also
# cover KERNELOFFSET and a moved phys_base.
KASLR = os.environ.get("VMM_DEBUG_KASLR") == "1"


@pytest.fixture(scope="module")
def linux():
    art = _artifacts()
    options = {}
    if KASLR:
        options = dict(kernel=str(art.bzimage), boot_via_decompressor=True,
                       cmdline="console=ttyS0 reboot=k panic=-1")
    m = Machine(kernel=options.pop("kernel", str(art.boot_image)), vmlinux=art.vmlinux,
                system_map=art.system_map, cpus=CPUS, memory="512M", **options)
    t0 = time.monotonic()
    m.start()
    try:
        m.wait_for_console(INIT_MARKER, timeout=BOOT_TIMEOUT)
    except Exception:
        m.stop()
        raise
    print(f"\n{art.name}: 'Run /init' after {time.monotonic() - t0:.1f} s")
    m.art = art
    yield m
    m.stop()


def test_kaslr_slide_is_what_the_guest_says(linux):
    with linux.freeze() as snap:
        live = linux.live(snap)
    print(f"slide {live.slide:#x} ({live.kaslr.source}, checked by {live.kaslr.checks}), "
          f"phys_base {live.phys_base:#x}")
    # KASLR is on unless the command line says nokaslr: the plain VMX/SVM path boots the
    # bzImage through its decompressor without it (VMM_DEBUG_KASLR=1 forces that);
    # PVM hosts add nokaslr.
    if "nokaslr" not in linux.cmdline.split():
        # the slide comes from LSTAR and agreed with what was cross-checked (IDT base,
        # linux_banner's bytes); a random slide may rarely be 0, so that is not asserted
        assert live.kaslr.source == "lstar" and live.kaslr.checks, live.kaslr
    else:
        assert live.slide == 0


@pytest.fixture(scope="module")
def prog(linux):
    return linux.drgn()


def _release(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode()


def test_drgn_agrees_with_vmm_on_every_cpu(linux, prog):
    with linux.freeze() as snap:
        live = linux.live(snap)
        cpus = live.possible_cpus()
        assert cpus == list(range(CPUS))
        cr3 = snap.vcpus[0].sregs.cr3
        assert prog["init_uts_ns"].name.release.string_().decode() == _release(
            live.read("init_uts_ns", "name.release", type="struct uts_namespace"))
        assert prog["jiffies"].value_() == live.read("jiffies")
        for name in ("jiffies", "init_uts_ns", "runqueues", "__per_cpu_offset"):
            assert prog.symbol(name).address == live.symbol_address(name), name
        init_mm = prog["init_mm"].address_of_()
        for cpu in cpus:
            assert prog["__per_cpu_offset"][cpu].value_() == live.per_cpu_offset(cpu)
            flags = cpu_rq(prog, cpu).scx.flags
            kva = live.per_cpu_address("runqueues", cpu, "scx.flags")
            assert flags.address_ == kva
            assert per_cpu_ptr(prog["runqueues"].address_of_(), cpu).value_() == \
                live.per_cpu_address("runqueues", cpu)
            assert flags.value_() == live.read("runqueues", "scx.flags", cpu=cpu)
            assert cpu_rq(prog, cpu).scx.clock.value_() == live.read("runqueues", "scx.clock",
                                                                     cpu=cpu)
            assert cpu_rq(prog, cpu).cpu.value_() == cpu
            # Page walks: drgn's through init_mm, ours through the vCPU's CR3 and the
            # shortcut (direct map / image map) the live view takes.
            gpa = live.kva_to_gpa(kva)
            assert follow_phys(init_mm, kva).value_() == gpa == walk(linux.memory, cr3, kva,
                                                                     live.la57)
            assert prog.read(gpa, 4, True) == linux.memory.read(gpa, 4)


def test_write_targets_a_drgn_object(linux, prog):
    mask = linux.kernel_image.enum("SCX_RQ_CLK_VALID")
    with linux.freeze():
        batch = [(T.from_drgn(cpu_rq(prog, cpu).scx.flags), V.or_u32(mask))
                 for cpu in range(CPUS)]
        batch += [(T.from_drgn(cpu_rq(prog, cpu).scx.clock), V.u64(0x1234_5678_9ABC))
                  for cpu in range(CPUS)]
        result = linux.apply(Op.WriteKernelCold(batch))
        for cpu in range(CPUS):
            assert cpu_rq(prog, cpu).scx.flags.value_() & mask
            assert linux.read("runqueues", "scx.clock", cpu=cpu) == 0x1234_5678_9ABC
    assert "unsigned int" in result.entries[0].location.description or \
        "u32" in result.entries[0].location.description
    # A type the kernel's BTF sizes differently is refused before anything is written.
    wrong = drgn.Object(prog, prog.int_type("u32", 8, False),
                        address=cpu_rq(prog, 0).scx.flags.address_)
    with pytest.raises(Exception, match="8 bytes to the debugger but 4 bytes"):
        linux.apply(Op.WriteKernelCold([(T.from_drgn(wrong), V.u64(0))]))


@pytest.fixture(scope="module")
def dumped(linux, tmp_path_factory):
    """One vmcore, and what vmm read in the same freeze."""
    path = tmp_path_factory.mktemp("vmcore") / "vmcore"
    with linux.freeze() as snap:
        report = linux.dump_core(path)
        live = linux.live(snap)
        expect = {
            "release": _release(live.read("init_uts_ns", "name.release",
                                          type="struct uts_namespace")),
            "jiffies": live.read("jiffies"),
            "offsets": [live.per_cpu_offset(c) for c in range(CPUS)],
            "flags": [live.read("runqueues", "scx.flags", cpu=c) for c in range(CPUS)],
            "flags_kva": [live.per_cpu_address("runqueues", c, "scx.flags") for c in range(CPUS)],
            "rip": [v.regs.rip for v in snap.vcpus],
            "jiffies_kva": live.symbol_address("jiffies"),
            "release_kva": live.address_of("init_uts_ns", "name.release",
                                           type="struct uts_namespace"),
        }
    print(f"\n{report.describe()}")
    return path, expect


def test_drgn_opens_the_vmcore(linux, dumped):
    path, expect = dumped
    core = drgn.Program()
    core.set_core_dump(str(path))
    core.load_debug_info([str(linux.art.vmlinux)], main=True)
    assert core["init_uts_ns"].name.release.string_().decode() == expect["release"]
    assert core["jiffies"].value_() == expect["jiffies"]
    for cpu in range(CPUS):
        assert core["__per_cpu_offset"][cpu].value_() == expect["offsets"][cpu]
        assert cpu_rq(core, cpu).scx.flags.address_ == expect["flags_kva"][cpu]
        assert cpu_rq(core, cpu).scx.flags.value_() == expect["flags"][cpu]


def _crash(vmlinux, vmcore, commands, minimal=False):
    # --kaslr=auto: crash 8.0.2 relocates a vmlinux only when told to; it then takes the
    # offset from our VMCOREINFO (SYMBOL(_stext) against the vmlinux's). --no_kmem_cache:
    # it does not know 7.x's slab layout (kmem_cache.num) and would stop there;
    # --no_modules: our kernels have no module support, which it insists on otherwise.
    args = ["crash", "-s", "--no_scroll", "--kaslr=auto"] + \
        (["--minimal"] if minimal else ["--no_kmem_cache", "--no_modules"]) + \
        [str(vmlinux), str(vmcore)]
    p = subprocess.run(args, input="\n".join(commands + ["quit"]) + "\n", capture_output=True,
                       text=True, timeout=600)
    return p.returncode, p.stdout + p.stderr


def test_crash_opens_the_vmcore(linux, dumped):
    if shutil.which("crash") is None:
        pytest.skip("crash is not installed (apt-get install crash; install-deps.sh does)")
    path, expect = dumped
    live_release_kva = expect["release_kva"]
    # rd/log/sym work in crash's full and minimal modes alike.
    cmds = [f"rd -a {live_release_kva:x}", "rd -64 jiffies 1", f"rd -64 __per_cpu_offset {CPUS}"]
    cmds += [f"rd -32 {expect['flags_kva'][c]:x} 1" for c in range(CPUS)]
    cmds += ["log | grep -c 'Run /init as init process'", "sym jiffies"]
    rc, out = _crash(linux.art.vmlinux, path, ["p init_uts_ns.name.release"] + cmds)
    mode = "full"
    if f'"{expect["release"]}' not in out:
        # crash 8.0.2 (Debian bookworm) predates Linux 7.x. When it cannot find the
        # vmlinux's banner where it looks, its fallback version check only knows "Linux
        # version 2." .. "6." and refuses a 7.x vmlinux as "not SMP" (fixed upstream by
        # crash commit 9550178, "Refactor kernel version checking code"), and later
        # start-up steps may trip on 7.x structures. Its minimal mode skips all that
        # and reads the same dump.
        print(f"crash full mode refused (rc {rc}):\n{out[-1500:]}")
        rc, out = _crash(linux.art.vmlinux, path, cmds, minimal=True)
        mode = "minimal"
    print(f"crash ({mode} mode) said:\n{out[-3000:]}")
    assert re.search(rf"{live_release_kva:x}:\s+{re.escape(expect['release'])}", out)
    assert re.search(rf":\s+{expect['jiffies']:016x}\b", out)
    assert re.search(r":\s+" + r"\s+".join(f"{o:016x}" for o in expect["offsets"]), out)
    for c in range(CPUS):
        assert re.search(rf"{expect['flags_kva'][c]:x}:\s+{expect['flags'][c]:08x}\b", out)
    assert re.search(r"^1$", out, re.M)  # the dump's printk ring holds the boot log
    assert re.search(rf"^{expect['jiffies_kva']:x} \(\w\) jiffies", out, re.M)  # relocated
