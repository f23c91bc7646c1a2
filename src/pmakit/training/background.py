"""Background exports: the merged model is written by a thread while training goes on.

At a cycle end each rank takes a CPU snapshot of its share of the average (pinned when it comes
from an accelerator; a CPU average is used as is, and the engine then waits for the writer before
it folds into it again). A writer thread then gathers the snapshots over a separate gloo process
group (so it never interleaves with training's own collectives) and the main process streams them
into the folder, which is published by rename only when complete. At most one export is in
flight: the next export, a checkpoint save, the end of training and anything that reads or
changes the average wait for it first, and a failure in the thread is raised there.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..errors import TrainingError


__all__ = ["BackgroundExportError", "BackgroundWriter", "side_process_group"]

logger = logging.getLogger(__name__)


class BackgroundExportError(TrainingError):
    """A background export failed; raised at the next join point (the cause is chained)."""


class BackgroundWriter:
    """Runs one export at a time in a thread; `join` waits for it and re-raises its failure."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._label = ""

    @property
    def busy(self) -> bool:
        """Whether an export is still being written."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, label: str, work: Callable[[], None]) -> None:
        """Wait for the previous export, then run ``work`` in a new thread."""
        self.join()
        self._label = label

        def run() -> None:
            try:
                work()
            except BaseException as err:  # surfaced by join()
                self._error = err

        self._thread = threading.Thread(target=run, name=f"pma-export-{label}", daemon=True)
        self._thread.start()

    def join(self) -> None:
        """Wait for the export in flight; raise `BackgroundExportError` if it failed."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        if self._error is not None:
            err, self._error = self._error, None
            raise BackgroundExportError(f"PMA: the background export of {self._label} failed: {err}") from err


_SIDE_GROUP: dict = {}


def side_process_group():
    """A gloo group over every rank for background gathers (created once; a collective the first time).

    None when no process group is initialised (a single process needs no communication).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    key = id(dist.group.WORLD)
    if key not in _SIDE_GROUP:
        _SIDE_GROUP[key] = dist.new_group(backend="gloo")
    return _SIDE_GROUP[key]
