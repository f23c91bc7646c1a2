"""A probe of this process's peak memory (RSS), shared by the export benchmark and the FSDP2 export test."""

from __future__ import annotations

import ctypes
import threading
import time

import psutil


class PeakRss:
    """Samples this process's RSS in a thread; ``peak`` is the largest rise above the start."""

    def __init__(self) -> None:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so reuse cannot hide a new copy
        self.process = psutil.Process()
        self.start = self.process.memory_info().rss
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss - self.start)
            time.sleep(0.0005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss - self.start)
