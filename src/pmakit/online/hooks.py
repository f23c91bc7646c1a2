"""Hook registries: the engine's public extension points, and the backend adapters of `attach_engine`.

Code around the engine (exporters, the sample store, merge schedules, background writers, backend
adapters) plugs in through these registries instead of reaching into the engine. A registry is an
ordered set of callables: adding one twice keeps one, and running it iterates over a snapshot, so a
hook may add or remove hooks (its own included) while it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar


__all__ = ["BACKENDS", "Hooks"]

H = TypeVar("H", bound=Callable[..., Any])
T = TypeVar("T")


class Hooks(Generic[H]):
    """An ordered set of hooks, run in the order they were added.

    Args:
        name: What the hooks are for, shown by ``repr``.
    """

    def __init__(self, name: str = "hooks") -> None:
        self.name = name
        self._hooks: list[H] = []

    def add(self, hook: H) -> H:
        """Add ``hook`` (once: adding it again changes nothing) and return it, so it can decorate a function."""
        if hook not in self._hooks:
            self._hooks.append(hook)
        return hook

    def remove(self, hook: H) -> None:
        """Remove ``hook``; one that is not registered is ignored (removing twice is harmless)."""
        if hook in self._hooks:
            self._hooks.remove(hook)

    def find(self, kind: type[T]) -> T | None:
        """The first hook that is an instance of ``kind`` (e.g. the exporter among the cycle-end handlers), or None."""
        return next((hook for hook in self._hooks if isinstance(hook, kind)), None)

    def run(self, *args: Any) -> None:
        """Call every hook with ``args``, in order (over a snapshot: hooks may change the registry)."""
        for hook in self:
            hook(*args)

    def clear(self) -> None:
        self._hooks.clear()

    def __iter__(self) -> Iterator[H]:
        return iter(list(self._hooks))

    def __len__(self) -> int:
        return len(self._hooks)

    def __contains__(self, hook: object) -> bool:
        return hook in self._hooks

    def __repr__(self) -> str:
        return f"Hooks({self.name}: {len(self._hooks)})"


# Adapters for optimizer wrappers the engine cannot see through on its own: `attach_engine` calls each with
# (engine, the optimizer as it was given), and each adapter returns at once unless its wrapper is in the chain.
# The DeepSpeed ZeRO adapter is registered by the `pmakit.online` package (it sits above the engine).
BACKENDS: Hooks[Callable[[Any, Any], None]] = Hooks("backend adapters")
