"""python -m vmm.kernelstore: the store's command line (kernels/Makefile uses it).

An entry point: like vmm/cli.py it sits above the store (tests/test_layers.py), and
nothing imports it."""

import sys

from vmm.cli_kernelstore import main

sys.exit(main())
