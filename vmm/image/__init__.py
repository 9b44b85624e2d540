"""Kernel image formats, below the machine and the introspection that both read them.

formats.py: detect and parse vmlinux ELF files (their program headers and notes: what
to load where) and bzImages, and extract_vmlinux (the one decompressor of a bzImage
payload); bootparams.py: the boot protocol's setup_header and zero page. Plain bytes
in, plain data out; imports only vmm.errors.
"""

from vmm.image.formats import (  # noqa: F401
    BzImage, ElfKernel, LoadSegment, detect_image_kind, detect_kernel_format,
    extract_vmlinux, parse_bzimage, parse_elf_kernel, read_image,
)
