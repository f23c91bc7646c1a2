"""Hostile and corrupt torch archives: every one is refused with an InputError naming the file and the
field, before its cost grows past that of an honest file of the same size.

The archives are hand-assembled (tests/helpers/archives.py) from the opcodes `torch.save` writes, with
one field changed; the honest one is checked against `torch.load` first, so each case differs from a
real checkpoint by that field alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pmakit.errors import InputError
from pmakit.io.torch_pickle import read_state_dict
from pmakit.merging import merge
from tests.helpers.archives import memo_bomb_pickle, op_global, op_str, tensor_pickle, write_archive, write_bomb


DATA = np.arange(12, dtype=np.float32).tobytes()


def test_the_honest_archive_is_what_torch_load_reads(tmp_path):
    path = write_archive(tmp_path / "w.bin", tensor_pickle([3, 4], [4, 1]), DATA)
    expected = torch.load(path, weights_only=True)["w"]
    info = read_state_dict(path)["w"]
    got = np.fromfile(path, np.float32, info.nbytes // 4, offset=info.start).reshape(info.shape)
    assert torch.equal(torch.from_numpy(got), expected)


# A BUILD right after the rebuilt tensor: sets its `shape` to a string (a frozen dataclass has no guard).
_BUILD = b"}" + op_str("shape") + op_str("xyz") + b"sb"
_STORAGE = op_global("torch", "FloatStorage")
_HONEST = tensor_pickle([3, 4], [4, 1])
# A BUILD on the storage class's stand-in (its dtype becomes a list), and one on the shared stand-in
# of torch.nn.Parameter (slot state: setattr on the class, which would outlive this file's load).
_STORAGE_BUILD = _HONEST.replace(_STORAGE, _STORAGE + b"}" + op_str("dtype") + b"]sb", 1)
_CLASS_BUILD = (
    _HONEST[:2] + op_global("torch.nn.parameter", "Parameter") + b"N}" + op_str("x") + b"Ns\x86b0" + _HONEST[2:]
)


@pytest.mark.parametrize(
    ("pickle", "message"),
    [
        (tensor_pickle([3, 4], [1]), r"`size` \[3, 4\] but `stride` \[1\] \(another rank\)"),
        (tensor_pickle([3, -4], [4, 1], numel=12), r"a pickled tensor's `size` must be a list of non-negative"),
        (tensor_pickle([3, 4], [4, 1], offset=-2), r"`storage_offset` must be a non-negative integer, got -2"),
        (tensor_pickle([3, 4], [4, 1], numel=-1), r"the `numel` of storage '0' must be a non-negative integer"),
        (tensor_pickle([3, 4], [4, 1], after=_BUILD), r"a BUILD opcode rewrites the fields of a rebuilt tensor"),
        (_STORAGE_BUILD, r"a BUILD opcode rewrites a storage type"),
        (_CLASS_BUILD, r"a BUILD opcode sets attribute 'x' of the class _TensorType"),
    ],
    ids=[
        "stride-rank",
        "negative-dimension",
        "negative-offset",
        "negative-numel",
        "build-rewrites-tensor",
        "build-rewrites-storage-type",
        "build-sets-a-class-attribute",
    ],
)
def test_malformed_tensor_fields_are_named(tmp_path, pickle, message):
    path = write_archive(tmp_path / "w.bin", pickle, DATA)
    with pytest.raises(InputError, match=message) as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_a_memo_index_beyond_the_pickle_is_refused_before_unpickling(tmp_path):
    path = write_archive(tmp_path / "w.bin", memo_bomb_pickle(1 << 20), DATA)
    with pytest.raises(InputError, match=r"memo index 1048576 at byte 3 \(opcode 3\)"):
        read_state_dict(path)


def test_a_compressed_member_is_refused(tmp_path):
    path = write_archive(tmp_path / "w.bin", tensor_pickle([3, 4], [4, 1]), DATA, compress=True)
    with pytest.raises(InputError, match=r"member 'archive/data.pkl' is compressed") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def _grow_member(path: Path, member: str, extra: int) -> None:
    """Make the central directory claim ``extra`` more bytes for ``member`` than the file holds."""
    raw = bytearray(path.read_bytes())
    name = member.encode()
    entry = raw.index(b"PK\x01\x02")  # the central directory: one 46-byte header + name per member
    while raw[entry + 46 : entry + 46 + len(name)] != name:
        entry = raw.index(b"PK\x01\x02", entry + 4)
    for field in (20, 24):  # compressed size, uncompressed size
        size = int.from_bytes(raw[entry + field : entry + field + 4], "little")
        raw[entry + field : entry + field + 4] = (size + extra).to_bytes(4, "little")
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("reader", ["mmap", "pread"])
def test_a_member_running_past_the_end_of_the_file_is_named(tmp_path, reader):
    """The storage claims 64 KiB more than the file holds, and the tensor fits that claim."""
    folders = []
    for i in range(2):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        size = len(DATA) // 4 + (16384 if i else 0)
        write_archive(folder / "pytorch_model.bin", tensor_pickle([size], [1]), DATA)
        folders.append(folder)
    _grow_member(folders[1] / "pytorch_model.bin", "archive/data/0", 65536)
    with pytest.raises(InputError, match=r"member 'archive/data/0': its `file_size` of 65584 bytes") as info:
        merge(folders, tmp_path / "out", allow_pickle=True, reader=reader, progress=False)
    assert str(folders[1] / "pytorch_model.bin") in str(info.value)
    assert not (tmp_path / "out").exists()


# The peak is VmHWM (per address space, so it starts afresh at exec): ru_maxrss survives exec on Linux
# and would report the forking test process's own size.
PEAK = """
import re, sys
from pmakit.errors import InputError
from pmakit.io.torch_pickle import read_state_dict
try:
    read_state_dict(sys.argv[1])
    outcome = "read"
except InputError as e:
    outcome = "refused: " + str(e)
with open("/proc/self/status") as f:
    print(re.search(r"VmHWM:\\s*(\\d+)", f.read()).group(1), outcome)
"""


def peak_rss(path: Path) -> tuple[int, str]:
    """Peak resident memory (KiB) of a fresh process reading ``path``, and what it said."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    rss, outcome = out.stdout.split(" ", 1)
    return int(rss), outcome.strip()


def _zip_bomb(path: Path) -> Path:
    return write_bomb(path, 256 << 20, DATA)  # 256 MiB of zeros in about 256 KB


def _memo_bomb(path: Path) -> Path:
    return write_archive(path, memo_bomb_pickle(1 << 24), DATA)  # a memo of 2**24 entries: 256 MiB


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak from /proc (Linux)")
@pytest.mark.parametrize("bomb", [_zip_bomb, _memo_bomb], ids=["deflated-data.pkl", "memo-index"])
def test_a_bomb_costs_no_more_than_an_honest_file_of_its_size(tmp_path, bomb):
    hostile = bomb(tmp_path / "bomb.bin")
    floats = max(12, hostile.stat().st_size // 4)
    honest = write_archive(tmp_path / "honest.bin", tensor_pickle([floats], [1]), bytes(4 * floats))
    honest_rss, honest_outcome = peak_rss(honest)
    hostile_rss, hostile_outcome = peak_rss(hostile)
    assert honest_outcome == "read"
    assert hostile_outcome.startswith("refused") and str(hostile) in hostile_outcome
    assert hostile_rss <= 2 * honest_rss, (hostile_rss, honest_rss)
