"""Lazy package exports (PEP 562), so that importing a package costs nothing until a name is used.

A package ``__init__`` that re-exports names from heavy modules (torch, megatron-core) would make
``clinmega --help`` import them all. Instead it declares where each name lives::

    __getattr__, __dir__ = lazy_exports(__name__, {"build_model": "clinmega.models.builder", ...})

and ``from clinmega.models import build_model`` imports ``clinmega.models.builder`` on first use.
"""

from __future__ import annotations

import importlib
from typing import Callable, Mapping


def lazy_exports(package: str, where: Mapping[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: each name in ``where`` is read from its module on
    first access (then cached in the package's namespace)."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__
