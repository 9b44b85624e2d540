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
    from page_tables import Tables

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


# --- a kernel that randomized everything, over synthetic page tables ----------------------------
RANDOM_SLIDE = 0x1E200000
IMAGE_GPA = 0x7400000  # where the decompressor put _text
POB = 0xFFFF9A4C00000000  # page_offset_base
VMALLOC = 0xFFFFB1C000000000  # < POB + 64 TiB: inside the architectural direct-map span
VMEMMAP = 0xFFFFE4C000000000
AREA_GPA, AREA_STRIDE = 0x3000000, 0x10000  # per-CPU areas (memblock: the direct map)
CPUS = 4


def randomized(style="absolute", user_pgd=False):
    """(kernel, Tables, lstar): the fixture booted with KASLR and RANDOMIZE_MEMORY:
    image slid virtually and moved physically, bases moved, per-CPU areas in the
    randomized direct map, every CPU's runqueues_fx.cpu = cpu."""
    from page_tables import Tables
    from vmm.kernel.elf import ElfImage

    path = kfixture.linked(style)
    k = Kernel.load(vmlinux=path)
    t = Tables()
    user = t.alloc() if user_pgd else None  # the PTI user half beside the kernel PGD
    assert user is None or user == t.root | 0x1000
    phys_base = (IMAGE_GPA - 0x1000000 - RANDOM_SLIDE) & MASK
    kfixture.load_image(t.mem, path, slide=RANDOM_SLIDE, phys_base=phys_base)
    text = k.symbol("_text") + RANDOM_SLIDE
    for va in range(text, k.symbol("_end") + RANDOM_SLIDE, 1 << 21):
        t.map(va, va - text + IMAGE_GPA, 1 << 21)
    t.map(POB, 0, 1 << 30)

    def image_gpa(name):
        return (k.symbol(name) + RANDOM_SLIDE - 0xFFFFFFFF80000000 + phys_base) & MASK

    for name, value in (("phys_base", phys_base), ("page_offset_base", POB),
                        ("vmalloc_base", VMALLOC), ("vmemmap_base", VMEMMAP)):
        t.mem.write_u64(image_gpa(name), value)
    img = ElfImage(path)
    (sec,) = [s for s in img.sections if s.name == ".data..percpu"]
    percpu = img.section_data(sec)
    img.close()
    start = k.symbol("__per_cpu_start")
    runtime_start = start + RANDOM_SLIDE if style == "absolute" else start  # relative: 0-based
    for cpu in range(CPUS):
        area = AREA_GPA + cpu * AREA_STRIDE
        offset = (POB + area - runtime_start) & MASK  # what setup_per_cpu_areas() stores
        t.mem.write(area, percpu)
        t.mem.write(area + k.symbol("runqueues_fx") - start, cpu.to_bytes(4, "little"))
        t.mem.write_u64(area + k.symbol("this_cpu_off") - start, offset)
        t.mem.write_u64(image_gpa("__per_cpu_offset") + 8 * cpu, offset)
    return k, t, k.symbol("entry_SYSCALL_64") + RANDOM_SLIDE


@pytest.mark.parametrize("style", ["absolute", "relative"])
def test_randomized_layout_found_and_cross_checked(style):
    k, t, lstar = randomized(style)
    live = k.attach(t.mem, cr3=t.root, lstar=lstar)
    lay = live.layout
    assert (lay.slide, lay.slide_source) == (RANDOM_SLIDE, "lstar")
    assert lay.phys_base == (IMAGE_GPA - 0x1000000 - RANDOM_SLIDE) & MASK
    assert lay.phys_base_source == "page walk" and lay.image_gpa == IMAGE_GPA
    assert (lay.page_offset_base, lay.vmalloc_base, lay.vmemmap_base) == (POB, VMALLOC, VMEMMAP)
    assert lay.image_randomized and lay.memory_randomized
    assert set(lay.checks) >= {"linux_banner", "phys_base = page walk", "direct map = image map"}
    # Per-CPU variables: symbol (+ slide when absolute) + __per_cpu_offset[cpu], a
    # randomized direct-map address.
    for cpu in range(CPUS):
        assert live.read("runqueues_fx", "cpu", cpu=cpu) == cpu
        kva = live.per_cpu_address("runqueues_fx", cpu)
        assert POB <= kva < VMALLOC
        assert live.kva_to_gpa(kva) == AREA_GPA + cpu * AREA_STRIDE + k.symbol("runqueues_fx") - k.symbol("__per_cpu_start")
    assert live.check_per_cpu() == list(range(CPUS))
    text = live.describe_layout()
    assert f"slide {RANDOM_SLIDE:#x}" in text and f"gpa {IMAGE_GPA:#x}" in text
    assert f"page_offset_base {POB:#x}" in text and "randomized" in text
    assert "this_cpu_off on 4 CPU(s)" in text
    assert live.layout.as_dict()["memory_randomized"] is True


def test_randomized_image_without_cr3_is_refused_not_misread():
    k, t, lstar = randomized()
    with pytest.raises(TranslationError, match="cr3|linux_banner"):
        k.attach(t.mem, lstar=lstar)


def test_user_cr3_under_page_table_isolation():
    """A vCPU frozen in user mode holds the PTI user PGD (kernel PGD | 4 KiB), which
    maps nothing of the kernel here: the kernel PGD beside it is walked instead."""
    k, t, lstar = randomized(user_pgd=True)
    live = k.attach(t.mem, cr3=t.root | 0x1000 | 0x3, lstar=lstar)  # + PCID bits
    assert live.layout.phys_base_source == "page walk"
    assert live.read("runqueues_fx", "cpu", cpu=3) == 3


def test_vmalloc_address_inside_the_direct_map_span_is_page_walked():
    k, t, lstar = randomized()
    t.map(VMALLOC + 0x5000, 0x6000000, 1 << 12)
    live = k.attach(t.mem, cr3=t.root, lstar=lstar)
    assert live.kva_to_gpa(VMALLOC + 0x5123) == 0x6000123  # not VMALLOC - POB + ...
    assert live.kva_to_gpa(POB + 0x1234) == 0x1234


def test_phys_base_disagreeing_with_the_page_tables():
    k, t, lstar = randomized()
    gpa = IMAGE_GPA + k.symbol("phys_base") - k.symbol("_text")
    t.mem.write_u64(gpa, 0)
    with pytest.raises(TranslationError, match="phys_base reads 0x0"):
        k.attach(t.mem, cr3=t.root, lstar=lstar)


def test_direct_map_disagreeing_with_the_image_map():
    k, t, lstar = randomized()
    wrong = POB + (1 << 30)
    t.map(wrong, 0x40000000, 1 << 30)  # a mapped region, but not of physical 0
    t.mem.write_u64(IMAGE_GPA + k.symbol("page_offset_base") - k.symbol("_text"), wrong)
    with pytest.raises(TranslationError, match="direct map"):
        k.attach(t.mem, cr3=t.root, lstar=lstar)


def test_per_cpu_check_names_the_cpu():
    k, t, lstar = randomized()
    area2 = AREA_GPA + 2 * AREA_STRIDE
    t.mem.write_u64(area2 + k.symbol("this_cpu_off") - k.symbol("__per_cpu_start"), 0x1000)
    live = k.attach(t.mem, cr3=t.root, lstar=lstar)
    with pytest.raises(TranslationError, match="cpu 2"):
        live.check_per_cpu()
    assert "per-CPU check FAILED" in live.describe_layout()


def test_bases_order_and_alignment():
    from vmm.kernel import kaslr

    defaults = (0xFFFF888000000000, 0xFFFFC90000000000, 0xFFFFEA0000000000)
    kaslr.check_bases(POB, VMALLOC, VMEMMAP, defaults)
    kaslr.check_bases(*defaults, defaults)
    with pytest.raises(TranslationError, match="not below"):
        kaslr.check_bases(POB, VMEMMAP, VMALLOC, defaults)
    with pytest.raises(TranslationError, match="1 GiB"):
        kaslr.check_bases(POB + 0x1000, VMALLOC, VMEMMAP, defaults)
    assert kaslr.phys_base_from_walk(0xFFFFFFFF81000000, 0x1000000) == 0
    assert kaslr.signed64(kaslr.phys_base_from_walk(0xFFFFFFFF81000000 + RANDOM_SLIDE, IMAGE_GPA)) \
        == IMAGE_GPA - 0x1000000 - RANDOM_SLIDE


def test_nokaslr_layout_is_the_default():
    k, mem = booted(0, 0)
    lay = k.attach(mem, lstar=k.symbol("entry_SYSCALL_64")).layout
    assert not lay.image_randomized and not lay.memory_randomized
    assert lay.image_gpa == 0x1000000 and lay.page_offset_base == 0xFFFF888000000000
    assert "default" in lay.describe()
