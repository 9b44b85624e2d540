# cffi's setuptools hook (cffi_modules) is only reachable through setup();
# everything else about the package lives in pyproject.toml.
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# Repository files the package needs at run time (vmm/resources.py finds them):
# copied into the built package as vmm/_data/<same path>.
SHIPPED = ("kernels/config/sched_ext.fragment", "kernels/config/sched_ext-scx.fragment",
           "kernels/init/spin-init.c",
           "kernels/init/check-init.c", "kernels/init/vmm-request.c", "kernels/init/sys.h",
           "kernels/init/relay.h", "kernels/init/job-init.c")


class BuildPyWithData(build_py):
    def run(self):
        super().run()
        for rel in SHIPPED:
            dest = Path(self.build_lib) / "vmm" / "_data" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest)


setup(cffi_modules=["ffi/build_native.py:ffibuilder"], cmdclass={"build_py": BuildPyWithData})
