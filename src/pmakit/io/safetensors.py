"""Reading and writing safetensors files block by block, with numpy only (no torch import).

The merger needs one element range of one tensor at a time, from many files. It parses the
(small, JSON) header itself, validating every offset against the file size so that a corrupt or
truncated file is refused before anything is read, and then reads ranges directly (see ``fold``).
The writer knows the whole layout up front, so it writes each shard's header first and then each
block at its final offset (``os.pwrite``): no shard is ever buffered in memory.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, brief
from .dtype_names import CONFIG_DTYPE_NAMES, DTYPE_ALIASES, FLOAT_DTYPES, ITEMSIZES, canonical_dtype, parse_size


__all__ = [
    "CONFIG_DTYPE_NAMES",
    "DTYPES",
    "DTYPE_ALIASES",
    "FLOAT_DTYPES",
    "ITEMSIZES",
    "Piece",
    "SafetensorsFile",
    "ShardWriter",
    "TensorInfo",
    "canonical_dtype",
    "parse_size",
    "plan_shards",
    "read_into",
    "storage_dtype",
]

_NUMPY_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ML_DTYPES_NAMES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class _DtypeTable(Mapping):
    """safetensors dtype name -> numpy dtype; bf16 and fp8 come from ``ml_dtypes``, imported on first use.

    ``import ml_dtypes`` costs 0.6 s with ml_dtypes 0.7 (0.08 s with 0.6), paid by every command that
    touched this table. Membership and sizes need no import (``ITEMSIZES``); the fold reads bf16 as its
    bit patterns (`storage_dtype`), so only fp8 data (and callers that ask for the bf16 dtype) import it.
    """

    def __getitem__(self, code: str) -> np.dtype:
        if code in _NUMPY_DTYPES:
            return _NUMPY_DTYPES[code]
        if code in _ML_DTYPES_NAMES:
            import ml_dtypes

            return np.dtype(getattr(ml_dtypes, _ML_DTYPES_NAMES[code]))
        raise KeyError(code)

    def __contains__(self, code: object) -> bool:
        return code in ITEMSIZES

    def __iter__(self) -> Iterator[str]:
        return iter(ITEMSIZES)

    def __len__(self) -> int:
        return len(ITEMSIZES)


DTYPES: Mapping[str, np.dtype] = _DtypeTable()


def storage_dtype(code: str) -> np.dtype:
    """The numpy dtype the fold reads and writes ``code`` as: bf16 as its ``uint16`` bit patterns (no ml_dtypes)."""
    return np.dtype(np.uint16) if code == "BF16" else DTYPES[code]


_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class Piece:
    """``count`` elements of a tensor, from element ``first``, stored in ``file`` from byte ``start``."""

    first: int
    count: int
    file: Path
    start: int


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: ``file`` from byte ``start`` (absolute) for ``nbytes``.

    A tensor saved in shards (DCP, DeepSpeed ZeRO) lists its ``pieces`` instead, in element order,
    tiling the tensor; ``file``/``start`` are then those of the first piece.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    nbytes: int
    pieces: tuple[Piece, ...] = ()

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file holding some of the tensor."""
        return tuple(dict.fromkeys(p.file for p in self.pieces)) if self.pieces else (self.file,)

    def spans(self, first: int, end: int) -> list[tuple[Path, int, int, int]]:
        """``(file, absolute byte start, first element, end element)`` of each stored run of ``[first, end)``."""
        size = self.itemsize
        if not self.pieces:
            return [(self.file, self.start + first * size, first, end)]
        out = []
        for p in self.pieces:
            lo, hi = max(first, p.first), min(end, p.first + p.count)
            if lo < hi:
                out.append((p.file, p.start + (lo - p.first) * size, lo, hi))
        return out

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return ITEMSIZES[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


class SafetensorsFile:
    """The validated header of one ``.safetensors`` file (the data is read later, in blocks)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._parse()

    def _bad(self, why: str) -> InputError:
        return InputError(f"Corrupt or truncated safetensors file {self.path}: {why}.")

    def _parse(self) -> None:
        header, base, size = self._read_header()
        data_len = size - base
        metadata = header.pop("__metadata__", {})
        if metadata is not None and not isinstance(metadata, dict):
            raise self._bad(f"its `__metadata__` is {type(metadata).__name__}, not an object")
        if metadata and not all(isinstance(v, str) for v in metadata.values()):
            raise self._bad("its `__metadata__` values must all be strings")
        self.metadata = dict(metadata or {})
        spans = []
        for name, entry in header.items():
            info = self._tensor(name, entry, base, data_len)
            spans.append((info.start - base, info.start - base + info.nbytes))
            self.tensors[name] = info
        self._check_contiguous(sorted(spans), data_len)

    def _read_header(self) -> tuple[dict, int, int]:
        """The JSON header, the absolute offset of the data section and the file size."""
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise self._bad(f"it has {size} bytes, fewer than the 8-byte header length")
                (header_len,) = struct.unpack("<Q", head)
                if header_len > min(_MAX_HEADER, size - 8):
                    raise self._bad(f"header length {header_len} does not fit in a file of {size} bytes")
                raw = f.read(header_len)
        except OSError as e:
            raise InputError(f"Cannot read {self.path}: {e.strerror or e}.") from e
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._bad(f"its header is not valid JSON ({e})") from e
        if not isinstance(header, dict):
            raise self._bad("its header is not a JSON object")
        return header, 8 + header_len, size

    def _tensor(self, name: str, entry: object, base: int, data_len: int) -> TensorInfo:
        """One header entry, checked field by field: dtype, shape (non-negative ints), offsets (two ints)."""
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise self._bad(f"tensor {brief(name)} has a malformed entry {brief(entry)}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise self._bad(f"tensor {brief(name)} has an unsupported dtype {brief(dtype)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise self._bad(f"tensor {brief(name)} has shape {brief(shape)}; dimensions must be non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o >= 0 for o in offsets):
            raise self._bad(
                f"tensor {brief(name)} has data_offsets {brief(offsets)}; they must be two non-negative integers"
            )
        begin, end = offsets
        info = TensorInfo(name, dtype, tuple(shape), self.path, base + begin, end - begin)
        if info.nbytes != info.numel * info.itemsize:
            need = info.numel * info.itemsize
            raise self._bad(f"tensor {brief(name)} spans {end - begin} bytes, but {dtype}{list(shape)} needs {need}")
        if end > data_len:
            raise self._bad(f"tensor {brief(name)} ends at byte {end} of a data section of only {data_len} bytes")
        return info

    def _check_contiguous(self, spans: list[tuple[int, int]], data_len: int) -> None:
        position = 0
        for begin, end in spans:
            if begin != position:
                raise self._bad(f"tensor data has a hole or overlap at byte {position}")
            position = end
        if position != data_len:
            raise self._bad(f"the data section has {data_len} bytes but its tensors cover {position}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_into(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    """Fill ``buffer`` from ``fd`` at ``offset`` (loops over short reads; errors name the file)."""
    done, want = 0, len(buffer)
    while done < want:
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got == 0:
            raise InputError(
                f"Corrupt or truncated safetensors file {path}: unexpected end of file at byte {offset + done}."
            )
        done += got


@dataclass
class OutputTensor:
    """One tensor of the output: its final dtype/shape and where it goes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: int = 0
    offset: int = 0  # absolute byte offset in the shard file

    @property
    def nbytes(self) -> int:
        n = ITEMSIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def plan_shards(tensors: list[OutputTensor], max_shard_size: int, stem: str = "model") -> list[str]:
    """Assign tensors to shards of at most ``max_shard_size`` bytes (a bigger tensor gets its own).

    Fills ``shard`` on every tensor and returns the shard file names, HF style
    (``model.safetensors`` or ``model-00001-of-00003.safetensors``).
    """
    shard, used = 0, 0
    for t in tensors:
        if used and used + t.nbytes > max_shard_size:
            shard, used = shard + 1, 0
        t.shard = shard
        used += t.nbytes
    count = shard + 1 if tensors else 1
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


# The order of safetensors' own writer (``safetensors.serialize``): by dtype, in this order, then by
# name. Writing that order makes a file byte-identical to ``save_pretrained``'s of the same tensors.
_DTYPE_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2")
_DTYPE_ORDER += ("I8", "U8", "BOOL")
_DTYPE_RANK = {name: rank for rank, name in enumerate(_DTYPE_ORDER)}


def _canonical_order(tensor: OutputTensor) -> tuple[int, bytes]:
    """A tensor's place in its shard as safetensors writes it (names compare as UTF-8 bytes)."""
    return _DTYPE_RANK.get(tensor.dtype, len(_DTYPE_RANK)), tensor.name.encode("utf-8")


class ShardWriter:
    """Writes planned shards: headers and file sizes first, then blocks at their offsets from any thread.

    Each shard's header and data follow safetensors' own order and JSON form (metadata first,
    then tensors by dtype and name, compact, space-padded to 8 bytes), so the same tensors give the
    same bytes as ``safetensors.torch.save_file`` and ``save_pretrained``, whatever order they are
    planned or written in.
    """

    def __init__(
        self, folder: Path, tensors: list[OutputTensor], names: list[str], metadata: dict | None = None
    ) -> None:
        self.folder = Path(folder)
        self.tensors = tensors
        self.names = names
        self.fds: list[int] = []
        meta = {"format": "pt", **(metadata or {})}
        for index, name in enumerate(names):
            members = sorted((t for t in tensors if t.shard == index), key=_canonical_order)
            header: dict = {"__metadata__": meta}
            position = 0
            for t in members:
                header[t.name] = {
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "data_offsets": [position, position + t.nbytes],
                }
                position += t.nbytes
            raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
            raw += b" " * (-len(raw) % 8)
            base = 8 + len(raw)
            for t in members:
                t.offset = base + header[t.name]["data_offsets"][0]
            fd = os.open(self.folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self.fds.append(fd)
            os.pwrite(fd, struct.pack("<Q", len(raw)) + raw, 0)
            self._reserve(fd, base + position, self.folder / name)

    @staticmethod
    def _reserve(fd: int, size: int, path: Path) -> None:
        """Claim the disk space now, so a full disk fails before the merge rather than at its end."""
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise InputError(f"Not enough disk space for {path} ({size} bytes).") from e
            os.ftruncate(fd, size)

    def write(self, tensor: OutputTensor, element_offset: int, data: np.ndarray) -> None:
        """Write ``data`` (already in the output dtype) as elements from ``element_offset`` of ``tensor``."""
        view = memoryview(np.ascontiguousarray(data).view(np.uint8))
        position = tensor.offset + element_offset * ITEMSIZES[tensor.dtype]
        fd = self.fds[tensor.shard]
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], position + done)

    def index(self) -> dict:
        """The ``model.safetensors.index.json`` content (HF layout: metadata + weight_map)."""
        total_size = sum(t.nbytes for t in self.tensors)
        total_parameters = 0
        for t in self.tensors:
            n = 1
            for d in t.shape:
                n *= d
            total_parameters += n
        return {
            "metadata": {"total_parameters": total_parameters, "total_size": total_size},
            "weight_map": {t.name: self.names[t.shard] for t in self.tensors},
        }

    def close(self) -> None:
        """Close every shard (like ``save_pretrained``, no fsync: the folder is published by rename)."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def abort(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
