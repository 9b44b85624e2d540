"""python -m vmm.kernelstore: the store's command line (kernels/Makefile uses it)."""

import sys

from vmm.kernelstore.cli import main

sys.exit(main())
