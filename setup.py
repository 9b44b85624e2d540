# cffi's setuptools hook (cffi_modules) is only reachable through setup();
# everything else about the package lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["ffi/build_native.py:ffibuilder"])
