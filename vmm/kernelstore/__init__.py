"""The kernel store: fetch, build, cache and find the Linux kernels under test.

Two sources, both from Debian's package registry:

* ``fetch_debian()``: Debian's prebuilt sched_ext-enabled cloud kernel from
  trixie-backports (``linux-binary-<abi>-cloud-amd64`` holds the vmlinuz,
  ``linux-base-<abi>-cloud-amd64`` the config).  The ``System.map`` shipped in
  linux-base is a one-line placeholder; the real one, and the full vmlinux with
  ``.symtab``/DWARF/BTF, are only in ``linux-image-<abi>-cloud-amd64-dbg`` (~350 MB),
  so that download is opt-in (``with_debug=True``).  Without it, ``system_map`` is
  None and ``vmlinux`` is the ELF decompressed from the vmlinuz (BTF, no .symtab).
* ``build_kernel()``: ``linux-source-<version>`` built with ``tinyconfig`` plus the
  committed fragment ``kernels/config/sched_ext.fragment``.  This is the kernel that
  boots in reasonable time on PVM hosts (see README.md, "Hosts").

Nothing touches the system's apt setup: apt-get runs with a private sources list
(the mirror the machine already uses, suites trixie + trixie-backports) and private
state/cache directories under the store.  apt-get verifies each .deb against the
SHA256 in the signed Packages index; we check it again and record it in a
``manifest.json`` next to the artifacts.

Layout under ``cache_root()`` (``$VMM_CACHE_DIR/kernels``, default ``~/.cache/vmm/kernels``)::

    apt/{sources.list,lists/,cache/,debs/}    private apt state and downloaded .debs
    debian/<abi>/                             vmlinuz, vmlinux, config, [System.map], manifest.json
    build/<version>-<fragment hash>/          bzImage, vmlinux, System.map, config, manifest.json
    build/<version>-<fragment hash>/src/      the unpacked, built source tree

The package: cache.py (where the store lives, artifacts, manifests, the lock, listing
and pruning), apt.py (the private apt), debian.py (Debian's prebuilt kernel and its
-dbg vmlinux), build.py (building from linux-source or your tree), resolve.py (a spec
to artifacts). Its command line is ``vmm kernel`` (vmm/cli.py); ``python -m
vmm.kernelstore`` (__main__.py, which kernels/Makefile uses) hands over to it through
vmm/cli_kernelstore.py: the entry points sit above the store, which imports none of them.
"""


from typing import TYPE_CHECKING

from vmm.lazy import lazy_exports

# Names load on first use (vmm/lazy.py): resolving a cached kernel ("build:7.3") needs
# neither the private apt nor the build machinery's imports.
__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(("DEBIAN_FLAVOUR", "DEFAULT_KEYRING", "DEFAULT_MIRROR", "PRIVATE_SUITES",
                     "PrivateApt", "_configured_mirror", "_deb_members"), "apt"),
    **dict.fromkeys(("BUILD_TOOLS", "DEFAULT_BUILD_VERSION", "DEFAULT_FRAGMENT", "FLAVOURS",
                     "build_kernel", "config_mismatches", "fragment_hash", "merge_fragment",
                     "parse_config"), "build"),
    **dict.fromkeys(("KernelArtifacts", "Progress", "_store_lock", "_version_key",
                     "_write_manifest", "cache_root", "list_kernels", "prune_sources"), "cache"),
    **dict.fromkeys(("_is_placeholder_system_map", "fetch_debian", "fetch_debug_vmlinux"),
                    "debian"),
    "resolve_kernel": "resolve",
})

__all__ = ["BUILD_TOOLS", "DEBIAN_FLAVOUR", "DEFAULT_BUILD_VERSION", "DEFAULT_FRAGMENT", "FLAVOURS", "DEFAULT_KEYRING",
           "DEFAULT_MIRROR", "PRIVATE_SUITES", "KernelArtifacts", "PrivateApt", "Progress", "build_kernel",
           "cache_root", "config_mismatches", "fetch_debian", "fetch_debug_vmlinux", "fragment_hash",
           "list_kernels", "merge_fragment", "parse_config", "prune_sources", "resolve_kernel",
           # private, for the tests
           "_configured_mirror", "_deb_members", "_is_placeholder_system_map", "_store_lock",
           "_version_key", "_write_manifest"]

if TYPE_CHECKING:
    from vmm.kernelstore.apt import (DEBIAN_FLAVOUR, DEFAULT_KEYRING, DEFAULT_MIRROR,
                                     PRIVATE_SUITES, PrivateApt, _configured_mirror, _deb_members)
    from vmm.kernelstore.build import (BUILD_TOOLS, DEFAULT_BUILD_VERSION, DEFAULT_FRAGMENT, FLAVOURS,
                                       build_kernel, config_mismatches, fragment_hash, merge_fragment,
                                       parse_config)
    from vmm.kernelstore.cache import (KernelArtifacts, Progress, _store_lock, _version_key,
                                       _write_manifest, cache_root, list_kernels, prune_sources)
    from vmm.kernelstore.debian import _is_placeholder_system_map, fetch_debian, fetch_debug_vmlinux
    from vmm.kernelstore.resolve import resolve_kernel
