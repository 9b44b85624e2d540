"""KASLR slide from MSR_LSTAR, cross-checked against linux_banner in guest memory
and the IDT base; phys_base found for a virtually slid image."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "data"))
import kfixture  # noqa: E402

from vmm.errors import TranslationError  # noqa: E402
from vmm.kernel import Kernel  # noqa: E402
from vmm.kernel.symbols import Symbol, SymbolTable  # noqa: E402

pytestmark = pytest.mark.skipif(kfixture.missing_tools() is not None,
                                reason=f"fixture build: {kfixture.missing_tools()}")
SLIDE = 0x2A00000
MASK = (1 << 64) - 1


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path / "cache"))


def booted(slide, phys_base):
    path = kfixture.linked()
    k = Kernel.load(vmlinux=path)
    mem = kfixture.FakeMemory()
    kfixture.load_image(mem, path, slide=slide, phys_base=phys_base)
    pb_gpa = (k.symbol("phys_base") + slide - 0xFFFFFFFF80000000 + phys_base) & MASK
    mem.write_u64(pb_gpa, phys_base)  # what __startup_64 stores
    return k, mem


def test_nokaslr():
    k, mem = booted(0, 0)
    live = k.attach(mem, lstar=k.symbol("entry_SYSCALL_64"))
    assert live.slide == 0 and live.kaslr.source == "lstar"
    assert "linux_banner" in live.kaslr.checks


def test_slide_from_lstar_with_banner_check():
    # Image moved virtually by SLIDE, still at its link physical address:
    # phys_base = -SLIDE, exactly what the kernel computes.
    k, mem = booted(SLIDE, (-SLIDE) & MASK)
    live = k.attach(mem, lstar=k.symbol("entry_SYSCALL_64") + SLIDE)
    assert live.slide == SLIDE
    assert live.phys_base == (-SLIDE) & MASK
    assert live.kaslr.checks == ("linux_banner",)
    assert live.symbol_address("linux_banner") == k.symbol("linux_banner") + SLIDE
    assert live.kva_to_gpa(k.symbol("_text") + SLIDE) == 0x1000000
    assert live.read("nr_cpu_ids") == 4


def test_given_slide():
    k, mem = booted(SLIDE, (-SLIDE) & MASK)
    assert k.attach(mem, kaslr_slide=SLIDE).kaslr.source == "given"


def test_idt_base_in_attach():
    k, mem = booted(0, 0)
    assert k.attach(mem, idt_base=0xFFFFFE0000000000).slide == 0  # cpu_entry_area: no check


def test_wrong_slide_is_caught_by_banner():
    k, mem = booted(SLIDE, (-SLIDE) & MASK)
    with pytest.raises(TranslationError, match="linux_banner|phys_base"):
        k.attach(mem, lstar=k.symbol("entry_SYSCALL_64") + SLIDE + 0x200000)


def test_nokaslr_assumption_fails_loudly_on_slid_kernel():
    k, mem = booted(SLIDE, (-SLIDE) & MASK)
    with pytest.raises(TranslationError):
        k.attach(mem)  # no LSTAR: slide assumed 0, which the image contradicts


def test_implausible_lstar():
    k, mem = booted(0, 0)
    with pytest.raises(TranslationError, match="LSTAR"):
        k.attach(mem, lstar=k.symbol("entry_SYSCALL_64") + 0x1234)
    with pytest.raises(TranslationError, match="LSTAR"):
        k.attach(mem, lstar=0xFFFF888000001000)


def test_idt_cross_check():
    from vmm.kernel import kaslr

    syms = SymbolTable([Symbol("idt_table", 0xFFFFFFFF82000000, 4096, "D", ".data"),
                        Symbol("entry_SYSCALL_64", 0xFFFFFFFF81000080, 0, "T", ".text")])
    assert kaslr.check_idt(syms, SLIDE, 0xFFFFFFFF82000000 + SLIDE) is True
    assert "IDT base" in kaslr.check_idt(syms, SLIDE, 0xFFFFFFFF82000000)
    # The cpu_entry_area alias a booted kernel loads, the VMM's boot IDT, an unknown
    # table in the image: nothing to conclude.
    assert kaslr.check_idt(syms, SLIDE, 0xFFFFFE0000000000) is None
    assert kaslr.check_idt(syms, SLIDE, 0x520) is None
    assert kaslr.check_idt(syms, SLIDE, 0xFFFFFFFF82000123) is None
    assert kaslr.slide_from_lstar(syms, 0xFFFFFFFF81000080 + SLIDE) == SLIDE


def test_physically_moved_image_found_through_page_tables():
    """Loaded 32 MiB above its link address and not slid virtually: neither phys_base
    guess holds, so phys_base itself is read through the guest's page tables."""
    from test_translate import Tables

    moved = 0x2000000
    t = Tables()
    k, _ = booted(0, 0)
    kfixture.load_image(t.mem, kfixture.linked(), phys_base=moved)
    pb = k.symbol("phys_base")
    pb_gpa = pb - 0xFFFFFFFF80000000 + moved
    t.mem.write_u64(pb_gpa, moved)
    t.map(pb & ~0x1FFFFF, (pb_gpa & ~0x1FFFFF), 1 << 21)
    with pytest.raises(TranslationError, match="cr3"):
        k.attach(t.mem)
    live = k.attach(t.mem, cr3=t.root)
    assert live.phys_base == moved
    assert live.kva_to_gpa(k.symbol("_text")) == 0x1000000 + moved
    assert live.read("nr_cpu_ids") == 4
    assert live.kaslr.checks == ("linux_banner",)
