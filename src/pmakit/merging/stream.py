"""The streaming fold: one block of one tensor at a time, one input at a time, into an fp32 accumulator.

Work is split into blocks of at most ``block_elements`` elements of one output tensor. For each
block a worker takes that element range from each input in turn (a zero-copy view of the
memory-mapped file, unmapped right after use, or an ``os.preadv`` copy into a reused buffer), adds
it into its accumulator with the input's weight, checks the result is finite, casts it to the output
dtype and writes it at its final place in the output shard. Memory is therefore a few blocks per
thread, independent of the number of inputs and of the largest tensor, and blocks are independent,
so a few threads (numpy releases the GIL in its loops) use every core.

When every weight is equal (SMA) the fold adds the inputs and scales once at the end, which
saves a pass per input; otherwise each input is scaled before it is added.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..errors import MergeError
from ..io.safetensors import DTYPES, ShardWriter, read_into
from .plan import MergePlan, PlannedTensor


__all__ = ["DEFAULT_BLOCK_ELEMENTS", "default_threads", "run_fold"]

_RELEASE_MARGIN = 1 << 20
DEFAULT_BLOCK_ELEMENTS = 1 << 18  # 1 MiB of fp32 accumulator: stays in cache while the inputs stream by


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class _Buffers(threading.local):
    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}
        self.arrays: dict[str, np.ndarray] = {}

    def get(self, key: str, nbytes: int) -> np.ndarray:
        if self.sizes.get(key, 0) < nbytes:
            self.arrays[key] = np.empty(nbytes, dtype=np.uint8)
            self.sizes[key] = nbytes
        return self.arrays[key][:nbytes]


def _blocks(plan: MergePlan, block: int) -> Iterator[tuple[PlannedTensor, int, int]]:
    for t in plan.tensors:
        numel = 1
        for d in t.out.shape:
            numel *= d
        if numel == 0:
            continue
        for e0 in range(0, numel, block):
            yield t, e0, min(numel, e0 + block)


class _Fold:
    def __init__(
        self,
        plan: MergePlan,
        writer: ShardWriter,
        fds: dict[Path, int],
        allow_nonfinite: bool,
        block: int,
        maps: dict[Path, mmap.mmap] | None = None,
    ):
        self.plan = plan
        self.writer = writer
        self.fds = fds
        self.maps = maps
        self.allow_nonfinite = allow_nonfinite
        self.block = block
        self.acc_dtype = np.dtype(plan.accumulate_dtype)
        self.weights = [self.acc_dtype.type(w) for w in plan.weights]
        self.equal = all(w == plan.weights[0] for w in plan.weights)
        self.buffers = _Buffers()

    def _read(self, info, e0: int, e1: int, key: str = "in") -> np.ndarray:
        spans = info.spans(e0, e1)
        dtype = DTYPES[info.dtype]
        if len(spans) == 1:
            file, start, _, _ = spans[0]
            if self.maps is not None:  # zero-copy view of the page cache; released by _release
                return np.frombuffer(self.maps[file], dtype, e1 - e0, start)
            raw = self.buffers.get(key, (e1 - e0) * dtype.itemsize)
            read_into(self.fds[file], memoryview(raw), start, file)
            return raw.view(dtype)
        # The block crosses shards (a DCP / ZeRO tensor): join its pieces in a buffer.
        raw = self.buffers.get(key, (e1 - e0) * dtype.itemsize)
        for file, start, lo, hi in spans:
            part = raw[(lo - e0) * dtype.itemsize : (hi - e0) * dtype.itemsize]
            if self.maps is not None:
                part[:] = np.frombuffer(self.maps[file], np.uint8, len(part), start)
            else:
                read_into(self.fds[file], memoryview(part), start, file)
        return raw.view(dtype)

    def _release(self, t: PlannedTensor, e0: int, e1: int) -> None:
        """Unmap the block's pages from this process (they stay in the page cache), so RSS stays bounded."""
        for info in t.inputs:
            self._release_one(info, e0, e1)

    def _release_one(self, info, e0: int, e1: int) -> None:
        if self.maps is None:
            return
        # The kernel maps pages around each fault ("fault-around"), also just before and after the
        # block; a margin on both sides unmaps those too (a neighbour in use simply faults them back).
        size = DTYPES[info.dtype].itemsize
        for file, start, lo, hi in info.spans(e0, e1):
            begin = max(0, start - _RELEASE_MARGIN) // mmap.PAGESIZE * mmap.PAGESIZE
            end = min(len(self.maps[file]), start + (hi - lo) * size + _RELEASE_MARGIN)
            self.maps[file].madvise(mmap.MADV_DONTNEED, begin, end - begin)

    def _as_acc(self, x: np.ndarray, key: str) -> np.ndarray:
        if x.dtype == self.acc_dtype:
            return x
        out = self.buffers.get(key, x.size * self.acc_dtype.itemsize).view(self.acc_dtype)
        np.copyto(out, x, casting="unsafe")
        return out

    def _finite(self, values: np.ndarray) -> bool:
        """All finite? One summing pass (NaN and Inf propagate into the sum); the exact check only if it is not."""
        if np.isfinite(np.add.reduce(values, dtype=self.acc_dtype)):
            return True
        return bool(np.isfinite(self._as_acc(values, "probe_acc")).all())

    def _check_finite(self, t: PlannedTensor, values: np.ndarray, e0: int, e1: int) -> None:
        if self.allow_nonfinite or self._finite(values):
            return
        for info in t.inputs:
            x = self._as_acc(self._read(info, e0, e1, "probe"), "probe_acc")
            if not np.isfinite(x).all():
                raise MergeError(
                    f"Tensor {t.out.name!r} holds NaN or Inf in {info.file}; "
                    "fix the input or pass allow_nonfinite=True (`--allow-nonfinite`)."
                )
        raise MergeError(
            f"Merging tensor {t.out.name!r} overflowed {self.plan.accumulate_dtype}; "
            "try accumulate_dtype='float64' or check the weights."
        )

    def _write(self, t: PlannedTensor, e0: int, values: np.ndarray, scale=None) -> None:
        """Write ``values`` (times ``scale``, computed in the accumulator dtype) in the output dtype."""
        out_dtype = DTYPES[t.out.dtype]
        if values.dtype != out_dtype:
            out = self.buffers.get("out", values.size * out_dtype.itemsize).view(out_dtype)
            if scale is None:
                np.copyto(out, values, casting="unsafe")
            else:  # one pass: multiply in the accumulator dtype, round once into the output dtype
                np.multiply(values, scale, out=out, dtype=values.dtype, casting="unsafe")
            values = out
        elif scale is not None:
            np.multiply(values, scale, out=values)
        self.writer.write(t.out, e0, values)

    def __call__(self, t: PlannedTensor, e0: int, e1: int) -> None:
        try:
            self._block(t, e0, e1)
        finally:
            self._release(t, e0, e1)

    def _block(self, t: PlannedTensor, e0: int, e1: int) -> None:
        if t.action == "merge":
            acc = self.buffers.get("acc", (e1 - e0) * self.acc_dtype.itemsize).view(self.acc_dtype)
            dt = self.acc_dtype
            pending = None
            for k, (info, w) in enumerate(zip(t.inputs, self.weights, strict=True)):
                x = self._read(info, e0, e1, f"in{k % 2}")  # two buffers: `pending` stays valid
                if self.equal:  # sum first, scale once when writing
                    if k == 0 and len(t.inputs) > 1:
                        pending = x  # added together with the second input: one pass for both
                        continue
                    if k == 0:
                        np.copyto(acc, x, casting="unsafe")
                    elif k == 1:
                        np.add(pending, x, out=acc, dtype=dt, casting="unsafe")
                        pending = None
                        self._release_one(t.inputs[0], e0, e1)
                    else:
                        np.add(acc, x, out=acc, dtype=dt, casting="unsafe")
                elif k == 0:
                    np.multiply(x, w, out=acc, dtype=dt, casting="unsafe")
                else:
                    tmp = self.buffers.get("tmp", acc.nbytes).view(dt)
                    np.multiply(x, w, out=tmp, dtype=dt, casting="unsafe")
                    np.add(acc, tmp, out=acc)
                del x
                self._release_one(info, e0, e1)  # one input's block mapped at a time
            self._check_finite(t, acc, e0, e1)
            self._write(t, e0, acc, self.weights[0] if self.equal else None)
        elif t.action == "base":
            info = t.inputs[0]
            x = self._read(info, e0, e1)
            if info.is_float and not self.allow_nonfinite and not self._finite(x):
                raise MergeError(
                    f"Tensor {t.out.name!r} holds NaN or Inf in {info.file}; "
                    "fix the input or pass allow_nonfinite=True (`--allow-nonfinite`)."
                )
            self._write(t, e0, x)
        else:  # integer / bool: identical in every input, copied
            ref = t.inputs[-1]
            x = self._read(ref, e0, e1)
            for info in t.inputs[:-1]:
                y = self._read(info, e0, e1, "other")
                if not np.array_equal(x.view(np.uint8), y.view(np.uint8)):
                    raise MergeError(
                        f"Integer/bool tensor {t.out.name!r} differs between {info.file} and {ref.file}; "
                        "such tensors are copied, not averaged, so they must be equal."
                    )
            self._write(t, e0, x)


def run_fold(
    plan: MergePlan,
    writer: ShardWriter,
    *,
    threads: int | None = None,
    allow_nonfinite: bool = False,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    progress: Callable[[int], None] | None = None,
    reader: str = "mmap",
) -> None:
    """Execute ``plan`` into ``writer``'s shards. The first error stops every worker and is raised.

    ``reader="mmap"`` reads the inputs as zero-copy views of the page cache and unmaps each block
    after use (``MADV_DONTNEED``); ``"pread"`` copies each block into a per-thread buffer.
    """
    if block_elements < 1:
        raise MergeError(f"`block_elements` must be positive, got {block_elements}.")
    if reader not in ("mmap", "pread"):
        raise MergeError(f"`reader` must be 'mmap' or 'pread', got {reader!r}.")
    files = {f for t in plan.tensors for i in t.inputs for f in i.files}
    fds: dict[Path, int] = {}
    maps: dict[Path, mmap.mmap] | None = {} if reader == "mmap" else None
    fold = None
    try:
        for f in files:
            try:
                fds[f] = os.open(f, os.O_RDONLY)
                if maps is not None:
                    maps[f] = mmap.mmap(fds[f], 0, access=mmap.ACCESS_READ)
                    maps[f].madvise(mmap.MADV_SEQUENTIAL)
            except OSError as e:
                raise MergeError(f"Cannot open {f}: {e.strerror}.") from e
        fold = _Fold(plan, writer, fds, allow_nonfinite, block_elements, maps)
        work = _blocks(plan, block_elements)
        lock = threading.Lock()
        stop = threading.Event()
        errors: list[BaseException] = []

        def worker() -> None:
            while not stop.is_set():
                with lock:
                    item = next(work, None)
                if item is None:
                    return
                try:
                    fold(*item)
                except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                    with lock:
                        errors.append(e)
                    stop.set()
                    return
                if progress is not None:
                    with lock:
                        progress(item[0].out.nbytes * (item[2] - item[1]) // max(1, _numel(item[0])))

        count = max(1, threads or default_threads())
        if count == 1:
            worker()
        else:
            pool = [threading.Thread(target=worker, name=f"pmakit-merge-{i}", daemon=True) for i in range(count)]
            for th in pool:
                th.start()
            try:
                for th in pool:
                    while th.is_alive():
                        th.join(0.2)
            except BaseException:
                stop.set()
                for th in pool:
                    th.join()
                raise
        if errors:
            raise errors[0]
    finally:
        fold = None  # drop the views into the maps before they close
        for m in (maps or {}).values():
            try:
                m.close()
            except BufferError:  # a view is still referenced (e.g. by a traceback): freed with it
                pass
        for fd in fds.values():
            os.close(fd)


def _numel(t: PlannedTensor) -> int:
    n = 1
    for d in t.out.shape:
        n *= d
    return n
