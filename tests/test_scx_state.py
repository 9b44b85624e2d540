"""m.scx: sched_ext's state read through BTF (vmm/kernel/scx_state.py).

Offline, over two kernels: tests/data/scx_fixture.c (sched_ext's 7.x declarations,
compiled with BTF: always) and the real BTF of our Linux 7.3 build (skipped when it is
not built), which proves the field paths against the kernel; the structures are laid out
at the BTF's offsets in a sparse fake memory. Also the refusals, wait_for_exit and the
watchdog (the 7.x member and the global of the 6.16-like variant) over fakes. The real
kernel's check (no scheduler: "disabled", ops None, exit None) shares the one boot of
tests/test_e2e_linux.py.
"""

import glob
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent / "data"))
from fake_resolver import Rendezvous  # noqa: E402
from kfixture import FakeLive, FakeMemory  # noqa: E402

from vmm.errors import GuestMemoryError, KernelFeatureMissing, VmmError  # noqa: E402
from vmm.kernel.scx_view import ScxView  # noqa: E402
from vmm.kernel.scx_state import (ScxLayout, ScxState, ScxTimeout,  # noqa: E402
                                  read_cstring, read_state)

REPO = Path(__file__).resolve().parents[1]
GUEST = REPO / "kernels/guests/out/guest.elf"
SCH = 0xFFFF888000100000    # where the fake kzalloc'd objects live (direct-map-like)
EI = 0xFFFF888000200000
MSG = 0xFFFF888000300FF0    # crosses a page: read_cstring goes page by page
REASON = 0xFFFFFFFF82000100


def _built_vmlinux():
    found = sorted(glob.glob(str(Path.home() / ".cache/vmm/kernels/build/7.3-*/vmlinux")))
    return found[0] if found else None


def build_fixture(tmp: Path, *defines: str) -> Path:
    """tests/data/scx_fixture.c linked like a vmlinux (kfixture.ld), with .BTF (pahole)."""
    import subprocess

    import kfixture
    why = kfixture.missing_tools()
    if why:
        pytest.skip(f"the sched_ext BTF fixture needs gcc, ld, pahole: {why}")
    obj, out = tmp / "scx_fixture.o", tmp / "scx_fixture.elf"
    for cmd in (["gcc", "-g", "-O0", "-fno-pic", "-mcmodel=kernel", "-fno-asynchronous-unwind-tables",
                 *defines, "-c", str(kfixture.HERE / "scx_fixture.c"), "-o", str(obj)],
                ["ld", "-static", "-nostdlib", "--build-id=sha1", "-T",
                 str(kfixture.HERE / "kfixture.ld"), "-o", str(out), str(obj)],
                ["pahole", "-J", str(out)]):
        subprocess.run(cmd, check=True, capture_output=True)
    return out


@pytest.fixture(scope="module", params=["fixture", "7.3"])
def kern(request, tmp_path_factory):
    """A kernel with sched_ext's 7.x layout: our C fixture of its declarations (always),
    and the real BTF of our Linux 7.3 build (when it is built)."""
    from vmm.kernel import Kernel
    if request.param == "fixture":
        return Kernel.load(vmlinux=build_fixture(tmp_path_factory.mktemp("scx")))
    path = _built_vmlinux()
    if path is None:
        pytest.skip("Linux 7.3 is not built (~/.cache/vmm/kernels/build/7.3-*/vmlinux): "
                    "make kernel-build; these tests check the field paths against its BTF")
    return Kernel.load(vmlinux=path)


def lay_out(live, lay, *, state, root=SCH, name=b"simple", claimed=0, ei_kind=0, reason=b"",
            msg=b"", code=0, cpu=-1):
    """The kernel's objects at the BTF's offsets: scx_enable_state_var, scx_root ->
    struct scx_sched -> struct scx_exit_info -> strings."""
    k = live.kernel
    live.u32(live.symbol_address("scx_enable_state_var"), k.enum(state))
    live.u64(live.symbol_address("scx_root"), root)
    if not root:
        return
    live.put(root, bytes(1024))
    live.put(root + lay.name_off, name.ljust(lay.name_len, b"\0"))
    live.u32(root + lay.exit_kind_off, k.enum(claimed) if claimed else 0)
    live.u64(root + lay.exit_info_off, EI)
    if lay.watchdog_off is not None:
        live.u64(root + lay.watchdog_off, 3000)
    live.put(EI, bytes(lay.ei_size))
    live.u32(EI + lay.ei_kind_off, k.enum(ei_kind) if ei_kind else 0)
    live.put(EI + lay.ei_cpu_off, struct.pack("<i", cpu))
    live.put(EI + lay.ei_code_off, struct.pack("<q", code))
    live.u64(EI + lay.ei_reason_off, REASON)
    live.u64(EI + lay.ei_msg_off, MSG)
    live.put(REASON, reason + b"\0")
    live.put(MSG, msg + b"\0")


# --- the 7.x layout: our fixture of its declarations, and the real 7.3 BTF ------------------
def test_layout_of(kern):
    lay = ScxLayout.of(kern)
    btf = kern.btf
    assert lay.name_off == btf.offsetof("struct scx_sched", "ops.name") and lay.name_len == 128
    assert lay.exit_info_off == btf.offsetof("struct scx_sched", "exit_info")
    assert lay.exit_kind_off == btf.offsetof("struct scx_sched", "exit_kind")
    assert lay.watchdog_off == btf.offsetof("struct scx_sched", "watchdog_timeout")
    assert lay.watchdog_global is None  # 7.x: the timeout is the scheduler's
    assert (lay.ei_reason_inline, lay.ei_msg_inline) == (0, 0)  # both char *
    assert lay.msg_len == 1024  # SCX_EXIT_MSG_LEN
    assert lay.states == {0: "enabling", 1: "enabled", 2: "disabling", 3: "disabled"}
    assert lay.exit_kinds[kern.enum("SCX_EXIT_ERROR_STALL")] == "SCX_EXIT_ERROR_STALL"
    assert lay.exit_kind_name(0) is None


def test_no_scheduler(kern):
    live = FakeLive(kern)
    lay_out(live, ScxLayout.of(kern), state="SCX_DISABLED", root=0)
    s = read_state(live)
    assert s == ScxState("disabled", None, None, None, None)
    assert not s.attached and not s.exited and s.consistent


def test_attached_scheduler(kern):
    live = FakeLive(kern)
    lay_out(live, ScxLayout.of(kern), state="SCX_ENABLED", name=b"simple")
    s = read_state(live)
    assert (s.state, s.ops, s.exit_kind, s.exit_reason, s.exit_msg) == ("enabled", "simple", None, None, None)
    assert s.sched == SCH and s.attached and s.consistent


def test_error_exit(kern):
    live = FakeLive(kern)
    msg = b"simple[1]: kworker/0:1[42] failed to run for 30.204s"
    lay_out(live, ScxLayout.of(kern), state="SCX_DISABLING", name=b"qmap",
            claimed="SCX_EXIT_ERROR_STALL", ei_kind="SCX_EXIT_ERROR_STALL",
            reason=b"runnable task stall", msg=msg, code=0, cpu=1)
    for frozen in (False, True):
        s = read_state(live, frozen=frozen)
        assert s.state == "disabling" and s.ops == "qmap"
        assert s.exit_kind == "SCX_EXIT_ERROR_STALL"
        assert s.exit_reason == "runnable task stall" and s.exit_msg == msg.decode()
        assert (s.exit_code, s.exit_cpu) == (0, 1)
    assert "SCX_EXIT_ERROR_STALL (runnable task stall)" in s.describe()


def test_claimed_but_not_written_yet(kern):
    """exit_kind is claimed before the message is written; exit_info->kind is set after:
    until then reason and message are not reported (they could be half written)."""
    live = FakeLive(kern)
    lay_out(live, ScxLayout.of(kern), state="SCX_ENABLED", claimed="SCX_EXIT_ERROR_BPF",
            ei_kind=None, reason=b"scx_bpf_error", msg=b"half wri")
    s = read_state(live)
    assert s.exit_kind == "SCX_EXIT_ERROR_BPF" and s.exited
    assert s.exit_reason is None and s.exit_msg is None


def test_disable_work_swapped_the_claim_for_done(kern):
    """The disable work swaps sch->exit_kind to SCX_EXIT_DONE and writes the kind it took
    into exit_info->kind: the exit is named by the latter (seen in the SVM lane on
    scx_simple's detach, which was read as SCX_EXIT_DONE before)."""
    live = FakeLive(kern)
    lay_out(live, ScxLayout.of(kern), state="SCX_DISABLING", claimed="SCX_EXIT_DONE",
            ei_kind="SCX_EXIT_UNREG", reason=b"unregistered from user space")
    s = read_state(live)
    assert (s.exit_kind, s.exit_reason) == ("SCX_EXIT_UNREG", "unregistered from user space")


def test_message_is_bounded(kern):
    live = FakeLive(kern)
    lay_out(live, ScxLayout.of(kern), state="SCX_DISABLING", claimed="SCX_EXIT_ERROR",
            ei_kind="SCX_EXIT_ERROR", reason=b"runtime error", msg=b"x" * 5000)
    assert read_state(live).exit_msg == "x" * 1024  # SCX_EXIT_MSG_LEN, no NUL needed


def test_unfrozen_read_redone_when_root_changes(kern):
    """scx_root cleared between the first pass and the re-check: the read is redone and
    says what holds after the change, consistently."""
    live = FakeLive(kern)
    lay = ScxLayout.of(kern)
    lay_out(live, lay, state="SCX_DISABLING", name=b"simple", claimed="SCX_EXIT_UNREG",
            ei_kind="SCX_EXIT_UNREG", reason=b"unregistered from user space")
    root_kva = live.symbol_address("scx_root")
    seen = []

    def clear_after_first_pass(kva, n):
        if kva == root_kva:
            seen.append(kva)
            if len(seen) == 2:  # the re-check of the first pass
                live.u64(root_kva, 0)
                live.u32(live.symbol_address("scx_enable_state_var"), kern.enum("SCX_DISABLED"))
    live.on_read = clear_after_first_pass
    s = read_state(live)
    assert s == ScxState("disabled", None, None, None, None)
    assert len(seen) >= 3


def test_unfrozen_read_that_never_settles_says_so(kern):
    live = FakeLive(kern)
    lay_out(live, ScxLayout.of(kern), state="SCX_ENABLED")
    state_kva = live.symbol_address("scx_enable_state_var")
    flip = [0]

    def always_changing(kva, n):
        if kva == state_kva:
            flip[0] ^= 1
            live.u32(state_kva, flip[0])
    live.on_read = always_changing
    s = read_state(live, retries=3)
    assert not s.consistent and "changed" in s.describe()


def test_dangling_pointer_is_read_again(kern):
    """An unfrozen read that follows a pointer into nothing (freed, reused) retries."""
    live = FakeLive(kern)
    lay_out(live, ScxLayout.of(kern), state="SCX_ENABLED")
    root_kva = live.symbol_address("scx_root")
    live.u64(root_kva, 0xFFFF888077700000)  # nothing there
    calls = []

    def fix_it(kva, n):
        if kva == 0xFFFF888077700000 + ScxLayout.of(kern).name_off:
            calls.append(kva)
            live.u64(root_kva, SCH)
    live.on_read = fix_it
    assert read_state(live).ops == "simple" and calls
    live.on_read = None
    live.u64(root_kva, 0xFFFF888077700000)
    with pytest.raises(VmmError, match="freeze=True"):
        read_state(live, retries=2)
    with pytest.raises(GuestMemoryError):
        read_state(live, frozen=True)


# --- ScxView: wait_for_exit, the watchdog ---------------------------------------------------
def view_over(live, **kwargs):
    freezes = Rendezvous()
    writes = []
    view = ScxView(live.kernel, live=lambda: live, freeze=freezes, frozen=lambda: freezes.held,
                   write_u64=lambda kva, v: writes.append((kva, v, freezes.held)), **kwargs)
    return view, freezes, writes


def test_wait_for_exit_follows_the_kernel(kern):
    live = FakeLive(kern)
    lay = ScxLayout.of(kern)
    lay_out(live, lay, state="SCX_ENABLED")
    steps = iter([
        dict(state="SCX_ENABLED", claimed="SCX_EXIT_ERROR_BPF"),   # claimed, msg not yet
        dict(state="SCX_DISABLING", claimed="SCX_EXIT_ERROR_BPF", ei_kind="SCX_EXIT_ERROR_BPF",
             reason=b"scx_bpf_error", msg=b"qmap: too many enqueues"),
    ])
    view, _, _ = view_over(live)
    polls = []

    def advance(kva, n):  # each new poll (a read of the enable state) moves the kernel on
        if kva == live.symbol_address("scx_enable_state_var"):
            polls.append(kva)
            if len(polls) % 4 == 0:
                step = next(steps, None)
                if step is not None:
                    live.on_read = None
                    lay_out(live, lay, **step)
                    live.on_read = advance
    live.on_read = advance
    s = view.wait_for_exit(timeout=10, interval=0.001)
    assert (s.exit_kind, s.exit_reason, s.exit_msg) == ("SCX_EXIT_ERROR_BPF", "scx_bpf_error",
                                                        "qmap: too many enqueues")
    assert view.last_exit == s


def test_wait_for_exit_when_the_exit_fell_between_polls(kern):
    live = FakeLive(kern)
    lay = ScxLayout.of(kern)
    lay_out(live, lay, state="SCX_ENABLED")
    view, _, _ = view_over(live)
    assert view.state().ops == "simple"
    polls = []

    def gone(kva, n):
        if kva == live.symbol_address("scx_enable_state_var"):
            polls.append(kva)
            if len(polls) == 5:
                live.on_read = None
                lay_out(live, lay, state="SCX_DISABLED", root=0)
    live.on_read = gone
    s = view.wait_for_exit(timeout=10, interval=0.001)
    assert s.state == "disabled" and s.exit_kind is None and s.ops is None


def test_wait_for_exit_catches_a_detach_between_polls_at_the_scx_root_watch(kern):
    """A scheduler that attaches and dies between two polls: the scx_root watchpoint's
    NULL write (the session arms it where data watchpoints hit) is caught, and the exit
    read there from the unlinked scx_sched (its ``old`` pointer), whole."""
    from types import SimpleNamespace

    live = FakeLive(kern)
    lay = ScxLayout.of(kern)
    lay_out(live, lay, state="SCX_DISABLED", root=0)
    armed = []

    class Handle:
        removed = False

        def remove(self):
            self.removed = True

    def watch_root(on_hit):
        armed.append((on_hit, Handle()))
        return armed[-1][1]

    view, _, _ = view_over(live, watch_root=watch_root)
    polls = []

    def life(kva, n):  # at the third poll the whole life happens, as two watch hits
        if kva == live.symbol_address("scx_enable_state_var"):
            polls.append(kva)
            if len(polls) == 3:
                live.on_read = None
                on_hit = armed[0][0]
                lay_out(live, lay, state="SCX_ENABLED")
                on_hit(SimpleNamespace(old=0, new=SCH, live=live))
                lay_out(live, lay, state="SCX_DISABLING", claimed="SCX_EXIT_ERROR_BPF",
                        ei_kind="SCX_EXIT_ERROR_BPF", reason=b"scx_bpf_error",
                        msg=b"main.bpf.c:42: test triggering error", name=b"qmap")
                on_hit(SimpleNamespace(old=SCH, new=0, live=live))
                live.u64(live.symbol_address("scx_root"), 0)  # unlinked, then freed
                live.put(SCH, bytes(1024))
                live.u32(live.symbol_address("scx_enable_state_var"), kern.enum("SCX_DISABLED"))
    live.on_read = life
    s = view.wait_for_exit(timeout=10, interval=0.001)
    assert (s.ops, s.exit_kind, s.exit_reason, s.exit_msg) == (
        "qmap", "SCX_EXIT_ERROR_BPF", "scx_bpf_error", "main.bpf.c:42: test triggering error")
    assert view.last_exit == s
    assert armed[0][1].removed  # the watch lives as long as the wait


def test_wait_for_exit_times_out_and_refuses_a_stopped_vm(kern):
    live = FakeLive(kern)
    lay_out(live, ScxLayout.of(kern), state="SCX_ENABLED")
    view, _, _ = view_over(live)
    with pytest.raises(ScxTimeout, match="no sched_ext exit within"):
        view.wait_for_exit(timeout=0.05, interval=0.01)
    stopped = ScxView(kern, live=lambda: live, running=lambda: False)
    with pytest.raises(VmmError, match="not running"):
        stopped.wait_for_exit(timeout=1)


def test_state_frozen_and_in_a_held_freeze(kern):
    live = FakeLive(kern)
    lay_out(live, ScxLayout.of(kern), state="SCX_ENABLED")
    view, freezes, _ = view_over(live)
    before = live.reads
    assert view.state(freeze=True).ops == "simple" and freezes.count == 1
    frozen_reads = live.reads - before
    before = live.reads
    view.state()
    assert live.reads - before > frozen_reads  # unfrozen: the re-check reads again
    with freezes():
        before = live.reads
        view.state()
        assert live.reads - before == frozen_reads  # inside a held freeze: one pass


def test_watchdog_timeout(kern):
    live = FakeLive(kern)
    lay = ScxLayout.of(kern)
    lay_out(live, lay, state="SCX_ENABLED")
    view, freezes, writes = view_over(live, hz=lambda: 100)
    assert view.watchdog_timeout_jiffies == 3000
    assert view.watchdog_timeout == 30.0  # seconds = jiffies / CONFIG_HZ
    view.watchdog_timeout = 600
    assert writes == [(SCH + lay.watchdog_off, 60000, True)]  # inside a freeze
    with pytest.raises(VmmError, match="out of range"):
        view.set_watchdog_timeout_jiffies(0)
    lay_out(live, lay, state="SCX_DISABLED", root=0)
    assert view.watchdog_timeout is None
    with pytest.raises(VmmError, match="no sched_ext scheduler is attached"):
        view.watchdog_timeout = 60
    nohz, _, _ = view_over(live)
    with pytest.raises(KernelFeatureMissing, match="CONFIG_HZ"):
        nohz.hz
    nohz.hz_override = 250
    assert nohz.hz == 250


def test_global_watchdog_layout(tmp_path):
    """The 6.16-like variant: the timeout is the global scx_watchdog_timeout, read and
    written there whether or not a scheduler is attached."""
    from vmm.kernel import Kernel
    kern = Kernel.load(vmlinux=build_fixture(tmp_path, "-DGLOBAL_WATCHDOG"))
    lay = ScxLayout.of(kern)
    assert lay.watchdog_off is None and lay.watchdog_global == "scx_watchdog_timeout"
    live = FakeLive(kern)
    live.put(SCH, bytes(1024))
    lay_out(live, lay, state="SCX_DISABLED", root=0)
    glob_kva = kern.symbols.address("scx_watchdog_timeout")
    live.u64(glob_kva, 3000)
    view, _, writes = view_over(live, hz=lambda: 1000)
    assert view.watchdog_timeout == 3.0
    view.watchdog_timeout = 0.5
    assert writes == [(glob_kva, 500, True)]


# --- refusals and strings (no kernel build needed) ------------------------------------------
def test_kernel_without_sched_ext_is_refused():
    if not GUEST.exists():
        pytest.skip("test guest not built: make guests")
    from vmm.kernel import Kernel
    with pytest.raises(KernelFeatureMissing, match="no sched_ext .*CONFIG_SCHED_CLASS_EXT"):
        ScxLayout.of(Kernel.load(vmlinux=GUEST))


def test_pre_616_layout_is_refused():
    old = SimpleNamespace(symbols={"scx_ops": 1, "scx_exit_info": 2, "scx_ops_enable_state_var": 3},
                          has_btf=True)
    with pytest.raises(KernelFeatureMissing, match="pre-6.16 layout .*scx_ops.* no scx_root"):
        ScxLayout.of(old)


def test_kernel_without_btf_is_refused():
    nobtf = SimpleNamespace(symbols={"scx_root": 1, "scx_enable_state_var": 2}, has_btf=False)
    with pytest.raises(KernelFeatureMissing, match="no BTF"):
        ScxLayout.of(nobtf)


def test_read_cstring_pages_and_bounds():
    mem = FakeMemory()
    mem.write(0x1FFA, b"across a page\0junk")
    live = SimpleNamespace(read_kva=mem.read)
    assert read_cstring(live, 0x1FFA, 100) == "across a page"
    assert read_cstring(live, 0x1FFA, 6) == "across"
    mem.write(0x3000, b"\xff\xfeok\0")
    assert read_cstring(live, 0x3000, 10) == "\ufffd\ufffdok"

# The real thing (Linux 7.3, and Debian's kernel in the SVM lane) shares the one boot of
# tests/test_e2e_linux.py: test_scx_verdicts_without_a_scheduler.
