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

import math
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..errors import MergeError, brief
from ..io.safetensors import ITEMSIZES, ShardWriter, read_into, storage_dtype
from . import convert
from .options import DEFAULT_BLOCK_ELEMENTS
from .plan import MergePlan, PlannedTensor


__all__ = ["DEFAULT_BLOCK_ELEMENTS", "default_threads", "run_fold"]

_RELEASE_MARGIN = 1 << 20


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
        numel = _numel(t)
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
        dtype = storage_dtype(info.dtype)
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

    def _float(self, x: np.ndarray, code: str, key: str) -> np.ndarray:
        """``x`` as numbers numpy computes with: bf16 bit patterns are widened (exactly) into fp32."""
        if code != "BF16":
            return x
        return convert.widen_bf16_bits(x, self.buffers.get(f"{key}_f32", x.size * 4).view(np.float32))

    def _read_float(self, info, e0: int, e1: int, key: str = "in") -> np.ndarray:
        return self._float(self._read(info, e0, e1, key), info.dtype, key)

    def _release(self, t: PlannedTensor, e0: int, e1: int) -> None:
        """Unmap the block's pages from this process (they stay in the page cache), so RSS stays bounded."""
        for info in t.inputs:
            self._release_one(info, e0, e1)

    def _release_one(self, info, e0: int, e1: int) -> None:
        if self.maps is None:
            return
        # The kernel maps pages around each fault ("fault-around"), also just before and after the
        # block; a margin on both sides unmaps those too (a neighbour in use simply faults them back).
        size = ITEMSIZES[info.dtype]
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

    def _stored_finite(self, x: np.ndarray, code: str) -> bool:
        """All finite, for ``x`` as read or written (bf16: bit patterns, checked without widening them)."""
        if code == "BF16":
            return convert.bf16_bits_finite(x, self.buffers.get("probe_bits", x.nbytes).view(np.uint16))
        return self._finite(x)

    def _check_finite(self, t: PlannedTensor, values: np.ndarray, e0: int, e1: int) -> None:
        if self.allow_nonfinite or self._finite(values):
            return
        for info in t.inputs:
            x = self._as_acc(self._read_float(info, e0, e1, "probe"), "probe_acc")
            if not np.isfinite(x).all():
                raise MergeError(
                    f"Tensor {brief(t.out.name)} holds NaN or Inf in {info.file}; "
                    "fix the input or pass allow_nonfinite=True."
                )
        raise MergeError(
            f"Merging tensor {brief(t.out.name)} overflowed {self.plan.accumulate_dtype}; "
            "try accumulate_dtype='float64' or check the weights."
        )

    def _check_cast(self, t: PlannedTensor, values: np.ndarray, out: np.ndarray) -> None:
        """A narrower output dtype (float16 over 7e4, an extrapolating merge) must not turn finite values into Inf."""
        narrower = out.dtype.itemsize < values.dtype.itemsize
        if self.allow_nonfinite or not narrower or self._stored_finite(out, t.out.dtype):
            return
        raise MergeError(
            f"Tensor {brief(t.out.name)} overflows {t.out.dtype} when written: its merged values exceed the largest "
            f"{t.out.dtype} number; choose a wider out_dtype=... or check the weights."
        )

    def _write(self, t: PlannedTensor, e0: int, values: np.ndarray, scale=None) -> None:
        """Write ``values`` (times ``scale``, computed in the accumulator dtype) in the output dtype."""
        out_dtype = storage_dtype(t.out.dtype)
        out = values
        if values.dtype != out_dtype:
            out = self.buffers.get("out", values.size * out_dtype.itemsize).view(out_dtype)
        with np.errstate(over="ignore"):  # an overflow is reported by name just below
            if t.out.dtype == "BF16" and out is not values:
                scratch = self.buffers.get("round", values.size * 4).view(np.uint32)
                stored = convert.store_bf16(values, out, scale, scratch)
            else:
                stored = convert.store(values, out, scale)
        if stored is not values:
            self._check_cast(t, values, stored)
        self.writer.write(t.out, e0, stored)

    def __call__(self, t: PlannedTensor, e0: int, e1: int) -> None:
        try:
            if t.action == "merge":
                self._merge_block(t, e0, e1)
            else:  # "base" (backbone-only) or "newest" (integer/bool): one input, copied
                self._copy_block(t, e0, e1)
        finally:
            self._release(t, e0, e1)

    def _merge_block(self, t: PlannedTensor, e0: int, e1: int) -> None:
        """Fold every input's block into the accumulator, check it is finite and write it."""
        acc = self.buffers.get("acc", (e1 - e0) * self.acc_dtype.itemsize).view(self.acc_dtype)
        if self.equal:
            self._sum_inputs(t, e0, e1, acc)
        else:
            self._weighted_sum_inputs(t, e0, e1, acc)
        self._check_finite(t, acc, e0, e1)
        self._write(t, e0, acc, self.weights[0] if self.equal else None)

    def _sum_inputs(self, t: PlannedTensor, e0: int, e1: int, acc: np.ndarray) -> None:
        """Equal weights: add the inputs (the first two in one pass); the one scale is applied on writing."""
        first = self._read_float(t.inputs[0], e0, e1)
        if len(t.inputs) == 1:
            np.copyto(acc, first, casting="unsafe")
            return
        second = self._read_float(t.inputs[1], e0, e1, "second")  # its own buffer: "in" still holds the first (pread)
        convert.sum_into(acc, first, second)
        del first, second
        self._release_one(t.inputs[0], e0, e1)
        self._release_one(t.inputs[1], e0, e1)
        for info in t.inputs[2:]:
            convert.add_into(acc, self._read_float(info, e0, e1))
            self._release_one(info, e0, e1)  # one input's block mapped at a time

    def _weighted_sum_inputs(self, t: PlannedTensor, e0: int, e1: int, acc: np.ndarray) -> None:
        """Unequal weights: scale each input's block in the accumulator dtype, then add it."""
        dt = self.acc_dtype
        for k, (info, w) in enumerate(zip(t.inputs, self.weights, strict=True)):
            if k == 0:
                np.multiply(self._read_float(info, e0, e1), w, out=acc, dtype=dt, casting="unsafe")
            else:
                convert.add_into(acc, self._read_float(info, e0, e1), w, self.buffers.get("tmp", acc.nbytes).view(dt))
            self._release_one(info, e0, e1)  # one input's block mapped at a time

    def _copy_block(self, t: PlannedTensor, e0: int, e1: int) -> None:
        """Copy the block of the one input (the base, or the newest for integers); floats must be finite."""
        info = t.inputs[0]
        x = self._read(info, e0, e1)
        if info.is_float and not self.allow_nonfinite and not self._stored_finite(x, info.dtype):
            raise MergeError(
                f"Tensor {brief(t.out.name)} holds NaN or Inf in {info.file}; fix the input or pass "
                "allow_nonfinite=True."
            )
        self._write(t, e0, x if info.dtype == t.out.dtype else self._float(x, info.dtype, "in"))


def _check_fold_settings(block_elements: int, reader: str) -> None:
    if block_elements < 1:
        raise MergeError(f"`block_elements` must be positive, got {block_elements}.")
    if reader not in ("mmap", "pread"):
        raise MergeError(f"`reader` must be 'mmap' or 'pread', got {brief(reader)}.")


def _open_inputs(plan: MergePlan, fds: dict[Path, int], maps: dict[Path, mmap.mmap] | None) -> None:
    """Open every input file once into ``fds`` (and map it into ``maps`` for the mmap reader)."""
    for f in {f for t in plan.tensors for i in t.inputs for f in i.files}:
        try:
            fds[f] = os.open(f, os.O_RDONLY)
            if maps is not None:
                maps[f] = mmap.mmap(fds[f], 0, access=mmap.ACCESS_READ)
                maps[f].madvise(mmap.MADV_SEQUENTIAL)
        except OSError as e:
            raise MergeError(f"Cannot open {f}: {e.strerror}.") from e


def _close_inputs(fds: dict[Path, int], maps: dict[Path, mmap.mmap] | None) -> None:
    for m in (maps or {}).values():
        try:
            m.close()
        except BufferError:  # a view is still referenced (e.g. by a traceback): freed with it
            pass
    for fd in fds.values():
        os.close(fd)


class _WorkQueue:
    """Blocks handed out to worker threads; the first error stops them all and is kept."""

    def __init__(self, work: Iterator[tuple[PlannedTensor, int, int]], progress: Callable[[int], None] | None):
        self.work = work
        self.progress = progress
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

    def worker(self, fold: _Fold) -> None:
        while not self.stop.is_set():
            with self.lock:
                item = next(self.work, None)
            if item is None:
                return
            try:
                fold(*item)
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                with self.lock:
                    self.errors.append(e)
                self.stop.set()
                return
            if self.progress is not None:
                t, e0, e1 = item
                with self.lock:
                    self.progress(t.out.nbytes * (e1 - e0) // max(1, _numel(t)))

    def run(self, fold: _Fold, threads: int) -> None:
        """Run ``threads`` workers to the end (in this thread when one); raise the first error."""
        if threads == 1:
            self.worker(fold)
        else:
            self._run_threads(fold, threads)
        if self.errors:
            raise self.errors[0]

    def _run_threads(self, fold: _Fold, threads: int) -> None:
        pool = [
            threading.Thread(target=self.worker, args=(fold,), name=f"pmakit-merge-{i}", daemon=True)
            for i in range(threads)
        ]
        for th in pool:
            th.start()
        try:
            for th in pool:
                while th.is_alive():
                    th.join(0.2)  # short joins keep Ctrl-C responsive
        except BaseException:
            self.stop.set()
            for th in pool:
                th.join()
            raise


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

    Args:
        plan: what to read and write (from :func:`pmakit.merging.plan.build_plan`).
        writer: the output shards, sized from the plan.
        threads: worker threads (default :func:`default_threads`).
        allow_nonfinite: accept NaN/Inf in inputs and results.
        block_elements: elements of one output tensor folded at a time.
        progress: called with the bytes written after each block.
        reader: ``"mmap"`` reads the inputs as zero-copy views of the page cache and unmaps each
            block after use (``MADV_DONTNEED``); ``"pread"`` copies each block into a per-thread buffer.

    Raises:
        MergeError: a bad setting, an unreadable input, NaN/Inf or an overflow.
    """
    _check_fold_settings(block_elements, reader)
    fds: dict[Path, int] = {}
    maps: dict[Path, mmap.mmap] | None = {} if reader == "mmap" else None
    fold = None
    try:
        _open_inputs(plan, fds, maps)
        fold = _Fold(plan, writer, fds, allow_nonfinite, block_elements, maps)
        _WorkQueue(_blocks(plan, block_elements), progress).run(fold, max(1, threads or default_threads()))
    finally:
        fold = None  # drop the views into the maps before they close
        _close_inputs(fds, maps)


def _numel(t: PlannedTensor) -> int:
    return math.prod(t.out.shape)
