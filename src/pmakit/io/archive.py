"""Bounds and checks shared by every reader of untrusted pickled files (``.bin``, ``.pt``, DCP, ZeRO).

A checkpoint from elsewhere is hostile until checked. Three rules keep its cost in proportion to
its size, and turn every malformed field into an :class:`~pmakit.errors.InputError` naming the
file and the field:

- zip members (:func:`zip_members`) are stored, not compressed (``torch.save`` never compresses,
  and a deflated member can inflate a thousandfold), and each lies inside the file: checked
  against the file's size before anything is mapped or read;
- pickles (:func:`scan_pickle`) are pre-scanned with :func:`pickletools.genops` before they are
  unpickled: a bounded size and opcode count, and memo indices no larger than the opcode count
  (the unpickler allocates its memo up to the largest index: 9 bytes could ask for gigabytes);
- fields are checked by type and range (:func:`as_count`, :func:`as_counts`, ...), and shown in
  messages through :func:`~pmakit.errors.brief`.
"""

from __future__ import annotations

import io
import pickletools
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from ..errors import InputError, brief


__all__ = [
    "MAX_PICKLE_BYTES",
    "MAX_PICKLE_OPS",
    "Member",
    "read_member",
    "as_count",
    "as_counts",
    "as_list",
    "as_mapping",
    "as_text",
    "scan_pickle",
    "zip_members",
]

# The largest pickle read: a state dict pickles in about 150 bytes per tensor, DCP metadata in a few
# hundred per chunk, so this is millions of tensors; larger is refused before it is unpickled.
MAX_PICKLE_BYTES = 1 << 30
MAX_PICKLE_OPS = MAX_PICKLE_BYTES // 2
_MEMO_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})
_LOCAL_HEADER = 30


def scan_pickle(data: bytes, source: str) -> None:
    """Refuse a pickle whose unpickling could cost more than its size: too big, too many opcodes,
    a memo index beyond the opcodes seen, or a declared length past its end.

    Raises:
        InputError: naming ``source`` and what is out of bounds.
    """
    if len(data) > MAX_PICKLE_BYTES:
        raise InputError(f"{source}: its pickle has {len(data)} bytes, more than the {MAX_PICKLE_BYTES} read.")
    ops = 0
    try:
        for opcode, arg, pos in pickletools.genops(data):
            ops += 1
            if ops > MAX_PICKLE_OPS:
                raise InputError(f"{source}: its pickle has more than {MAX_PICKLE_OPS} opcodes.")
            if opcode.name in _MEMO_OPS and not 0 <= int(arg) <= ops:
                raise InputError(
                    f"{source}: its pickle uses memo index {brief(arg)} at byte {pos} (opcode {ops}); "
                    "a checkpoint's pickle numbers its memo in order (a large index only costs memory)."
                )
            if opcode.name == "FRAME" and arg > len(data) - pos:
                raise InputError(f"{source}: its pickle declares a frame of {arg} bytes past its end.")
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - genops fails in many ways on a corrupt pickle
        raise InputError(f"{source} is not a readable checkpoint pickle: {brief(e)}.") from None


@dataclass(frozen=True)
class Member:
    """One stored member of a zip archive: ``size`` bytes from ``start``, relative to the archive's start."""

    name: str
    start: int
    size: int


class _FileSlice(io.RawIOBase):
    """A read-only window ``[start, start + length)`` of a file, so an embedded zip reads as a file."""

    def __init__(self, f: BinaryIO, start: int, length: int) -> None:
        super().__init__()
        self._f, self._start, self._length, self._pos = f, start, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        want = min(len(buffer), max(0, self._length - self._pos))
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buffer)[:want])
        self._pos += got
        return got


def zip_members(f: BinaryIO, base: int, size: int, label: str) -> dict[str, Member]:
    """The members of the zip archive at bytes ``[base, base + size)`` of ``f``, each checked to be
    stored (not compressed) and to lie inside the archive, before any is read.

    Raises:
        InputError: not a zip archive, or a member compressed, with a corrupt local header, or past the end.
    """
    try:
        archive = zipfile.ZipFile(io.BufferedReader(_FileSlice(f, base, size)))
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:  # zipfile fails in several ways
        raise InputError(
            f"{label} is not a torch zip archive ({brief(e)}); legacy (pre-1.6) torch.save files are not read."
        ) from None
    with archive:
        return {info.filename: _member(f, base, size, info, label) for info in archive.infolist()}


def read_member(f: BinaryIO, base: int, member: Member, label: str, limit: int = MAX_PICKLE_BYTES) -> bytes:
    """The bytes of a checked ``member`` (at most ``limit``: it is read into memory)."""
    if member.size > limit:
        raise InputError(f"{label}: member {brief(member.name)} has {member.size} bytes, more than the {limit} read.")
    f.seek(base + member.start)
    data = f.read(member.size)
    if len(data) != member.size:
        raise InputError(f"{label}: member {brief(member.name)} ends early (the file shrank while read).")
    return data


def _member(f: BinaryIO, base: int, size: int, info: zipfile.ZipInfo, label: str) -> Member:
    where = f"{label}: member {brief(info.filename)}"
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise InputError(
            f"{where} is compressed; torch never writes that (a compressed member can inflate unbounded)."
        )
    if info.header_offset + _LOCAL_HEADER > size:
        raise InputError(f"{where}: its local header at byte {info.header_offset} lies past the end ({size} bytes).")
    f.seek(base + info.header_offset)
    local = f.read(_LOCAL_HEADER)
    if len(local) < _LOCAL_HEADER or local[:4] != b"PK\x03\x04":
        raise InputError(f"{where} has a corrupt local header.")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    start = info.header_offset + _LOCAL_HEADER + name_len + extra_len
    if start + info.file_size > size:
        raise InputError(
            f"{where}: its `file_size` of {info.file_size} bytes from byte {start} runs past the end of the "
            f"archive ({size} bytes); the file is truncated or corrupt."
        )
    return Member(info.filename, start, info.file_size)


def _field(where: str, expected: str, value: Any) -> InputError:
    return InputError(f"{where} must be {expected}, got {brief(value)}.")


def as_count(value: Any, where: str) -> int:
    """``value``, a non-negative int (not a bool), else an error: ``where`` names the file and field."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _field(where, "a non-negative integer", value)
    return int(value)


def as_counts(value: Any, where: str) -> tuple[int, ...]:
    """``value``, a tuple or list of non-negative ints (a shape, offsets), as a tuple."""
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise _field(where, "a list of non-negative integers", value)
    return tuple(int(v) for v in value)


def as_text(value: Any, where: str) -> str:
    """``value``, a str."""
    if not isinstance(value, str):
        raise _field(where, "a string", value)
    return str(value)


def as_mapping(value: Any, where: str) -> Mapping:
    """``value``, a dict (an ``OrderedDict`` included)."""
    if not isinstance(value, dict):
        raise _field(where, "a mapping", value)
    return value


def as_list(value: Any, where: str) -> list | tuple:
    """``value``, a list or tuple."""
    if not isinstance(value, (list, tuple)):
        raise _field(where, "a list", value)
    return value
