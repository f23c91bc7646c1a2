"""Hand-assembled `torch.save` archives: the opcodes torch writes for `{"w": tensor}`, with one field
changed where a test needs a file torch never writes (a hostile or corrupt checkpoint).

An honest archive from `write_archive(path, tensor_pickle(...))` is what `torch.save` writes for
the same tensor (checked against `torch.load` in tests/io/test_archive.py).
"""

from __future__ import annotations

import math
import struct
import zipfile
from pathlib import Path


def op_int(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)  # BININT


def op_str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()  # GLOBAL


def op_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def tensor_pickle(size, stride, *, offset=0, numel=None, storage="FloatStorage", after=b"") -> bytes:
    """`{"w": tensor}` pickled as torch.save does (protocol 2); ``after`` runs right after the tensor is rebuilt."""
    numel = math.prod(size) if numel is None else numel
    persistent = op_tuple(op_str("storage"), op_global("torch", storage), op_str("0"), op_str("cpu"), op_int(numel))
    hooks = op_global("collections", "OrderedDict") + b")R"  # OrderedDict()
    args = op_tuple(
        persistent + b"Q", op_int(offset), op_tuple(*map(op_int, size)), op_tuple(*map(op_int, stride)), b"\x89", hooks
    )
    return b"\x80\x02}" + op_str("w") + op_global("torch._utils", "_rebuild_tensor_v2") + args + b"R" + after + b"s."


def write_archive(path: Path, pickle: bytes, data: bytes, *, compress: bool = False) -> Path:
    """A torch zip archive: ``archive/data.pkl`` (deflated if ``compress``), ``archive/data/0`` = ``data``."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle, compress_type=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/data/0", data)
        z.writestr("archive/version", b"3\n")
    return Path(path)


def write_bomb(path: Path, inflated: int, data: bytes) -> Path:
    """A small archive whose deflated ``data.pkl`` inflates to ``inflated`` bytes: a bytes value of zeros,
    dropped (POP) before an honest `{"w": tensor}` pickle. Written in chunks (the zeros are never in memory)."""
    honest = tensor_pickle([len(data) // 4], [1])
    info = zipfile.ZipInfo("archive/data.pkl")
    info.compress_type = zipfile.ZIP_DEFLATED
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(path, "w") as z:
        with z.open(info, "w") as f:
            f.write(b"\x80\x03B" + struct.pack("<I", inflated))  # PROTO 3, BINBYTES of `inflated` bytes
            for done in range(0, inflated, len(chunk)):
                f.write(chunk[: inflated - done])
            f.write(b"0" + honest[2:])  # POP, then the honest pickle after its PROTO
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/data/0", data)
    return Path(path)


def memo_bomb_pickle(index: int) -> bytes:
    """Nine bytes: None, stored at memo index ``index`` (LONG_BINPUT). An unpickler grows its memo to the index."""
    return b"\x80\x02Nr" + struct.pack("<I", index) + b"."
