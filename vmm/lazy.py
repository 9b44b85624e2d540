"""Packages whose names load on first use (PEP 562), so that importing one costs only
what the caller touches.

`from vmm import Machine` on the plain boot path needs the machine and its runtime, not
BTF, the page walker or the op batch; with every package ``__init__`` importing all of
its modules eagerly that start-up was ~50 ms natively, and ~20 times that under the SVM
lane's emulated CPU, ahead of a guest boot of a few seconds. A package lists its public
names and the module each lives in; the real import statements stay in an ``if
TYPE_CHECKING:`` block beside it, for readers, type checkers and tests/test_layers.py.
A leaf module: any layer may import it.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, where: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list]]:
    """(__getattr__, __dir__) for `package`: each name of `where` (name -> module, relative
    to the package) is imported from its module the first time it is asked for."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value  # the next lookup is a plain attribute
        return value

    def __dir__() -> list:
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__
