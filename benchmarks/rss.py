"""A probe of this process's peak memory, shared by the export benchmark and the FSDP2 export test.

It reads the anonymous part of the resident set (``RssAnon``: heap, tensors, buffers) where Linux reports
it: a gathered copy of the model lives there, while library code paged in on first use (``RssFile``)
would only add noise of the order of the bound being tested.
"""

from __future__ import annotations

import ctypes
import threading
import time

import psutil


def anonymous_rss(process: psutil.Process) -> int:
    """Bytes of anonymous resident memory (``RssAnon``), or the whole RSS where the kernel does not say."""
    try:
        with open(f"/proc/{process.pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return process.memory_info().rss


class PeakRss:
    """Samples this process's anonymous RSS in a thread; ``peak`` is the largest rise above the start."""

    def __init__(self) -> None:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so reuse cannot hide a new copy
        self.process = psutil.Process()
        self.start = anonymous_rss(self.process)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, anonymous_rss(self.process) - self.start)
            time.sleep(0.0005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anonymous_rss(self.process) - self.start)
