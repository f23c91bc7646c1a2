"""Public names imported on first use (PEP 562), so `import pmakit` stays light: written once for every package.

A package lists where each of its public names lives and gets the module hooks back. The first access
imports the module and caches the value in the package, so later accesses cost nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from importlib import import_module
from typing import Any


__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, str], public: Iterable[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps a name to its module, relative to it."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            from .errors import brief

            raise AttributeError(f"module '{package}' has no attribute {brief(name)}")
        where = exports[name]
        value = getattr(import_module(where if where.startswith(".") else f".{where}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    names = sorted(public)
    return __getattr__, lambda: names
