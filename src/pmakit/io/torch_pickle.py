"""Reading what ``torch.save`` writes, without torch: tensors become byte ranges of the file.

``torch.save`` writes a zip archive: ``<archive>/data.pkl`` (a pickle of the object, whose tensors
refer to storages by key), ``<archive>/data/<key>`` (each storage's raw bytes, little-endian) and a
few small records (``byteorder``, ``version``). The members are stored uncompressed, so every
storage is a plain byte range of the file, and a contiguous tensor is a byte range inside it: the
same :class:`~pmakit.io.safetensors.TensorInfo` the safetensors reader gives, read zero-copy by the
merger's streaming fold. Nothing is converted or copied.

Every bound of :mod:`pmakit.io.archive` applies: members stored and inside the file, the pickle
pre-scanned before it is unpickled, every field checked. The pickle is read by the allow-list
unpickler of :mod:`pmakit.io.torch_unpickler` (its names are importable from here too), which
refuses any class or function that a state dict or checkpoint metadata does not need.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import InputError, brief
from .archive import read_member, zip_members
from .safetensors import DTYPES, ITEMSIZES, TensorInfo
from .torch_unpickler import AllowListUnpickler, MetadataIndex, Record, StorageRef, TensorRef, read_pickle
from .torch_unpickler import TorchDtype as TorchDtype  # importable from here, as before the unpickler moved


__all__ = [
    "AllowListUnpickler",
    "MetadataIndex",
    "Record",
    "StorageRef",
    "TensorRef",
    "TorchArchive",
    "read_pickle",
    "read_state_dict",
]


class TorchArchive:
    """One ``torch.save`` archive (a whole file, or a byte range of one as in DCP's ``.distcp`` files).

    Args:
        path: the file.
        start: where the archive begins in the file (bytes).
        length: its length (default: to the end of the file).

    Raises:
        InputError: not a torch zip archive, a compressed or big-endian one, or a refused pickle.
    """

    def __init__(self, path: str | os.PathLike, start: int = 0, length: int | None = None) -> None:
        self.path = Path(path)
        self.start = start
        self.label = str(self.path) if not start and length is None else f"{self.path} (bytes {start}+{length})"
        self.records: dict[str, tuple[int, int]] = {}  # storage key -> (absolute start, nbytes)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if length is not None and start + length > size:
                    raise InputError(f"{self.label} runs past the end of the file ({size} bytes).")
                self.obj = self._read(f, size if length is None else length)
        except OSError as e:
            raise InputError(f"Cannot read {self.label}: {e.strerror or e}.") from e

    def _read(self, f, size: int) -> Any:
        members = zip_members(f, self.start, size, self.label)
        pickles = [n for n in members if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise InputError(f"{self.label} is not a torch.save archive: no single `<archive>/data.pkl`.")
        prefix = pickles[0][: -len("data.pkl")]
        order = members.get(f"{prefix}byteorder")
        if order is not None and read_member(f, self.start, order, self.label, limit=16) != b"little":
            raise InputError(f"{self.label} was written on a big-endian machine; it is not read.")
        for name, member in members.items():
            if name.startswith(f"{prefix}data/"):
                self.records[name[len(f"{prefix}data/") :]] = (self.start + member.start, member.size)
        return read_pickle(read_member(f, self.start, members[pickles[0]], self.label), self.label)

    def tensor_info(self, name: str, ref: TensorRef) -> TensorInfo:
        """``ref`` as a byte range of the file, checked against its storage.

        Raises:
            InputError: the tensor is a non-contiguous view, or lies outside its storage.
        """
        if ref.dtype not in DTYPES:
            raise InputError(f"Tensor {brief(name)} in {self.label} has an unsupported dtype {ref.dtype}.")
        if not ref.is_contiguous:
            raise InputError(
                f"Tensor {brief(name)} in {self.label} is a non-contiguous view (shape {brief(list(ref.shape))}, "
                f"stride {brief(list(ref.stride))}); save it with .contiguous() or as safetensors."
            )
        if ref.storage.key not in self.records:
            raise InputError(
                f"Tensor {brief(name)} in {self.label} refers to a missing storage {brief(ref.storage.key)}."
            )
        begin, length = self.records[ref.storage.key]
        itemsize = ITEMSIZES[ref.dtype]
        nbytes = ref.numel * itemsize
        if ref.offset * itemsize + nbytes > length:
            raise InputError(
                f"Tensor {brief(name)} in {self.label} ({ref.dtype}{brief(list(ref.shape))} at element {ref.offset}) "
                f"does not fit in its storage of {length} bytes."
            )
        return TensorInfo(name, ref.dtype, ref.shape, self.path, begin + ref.offset * itemsize, nbytes)


def read_state_dict(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """The tensors of a ``torch.save``-d flat state dict (``pytorch_model.bin``), as byte ranges.

    Tied weights (several names, one storage) all point at the same bytes.

    Raises:
        InputError: not a flat ``{name: tensor}`` mapping, or a tensor that cannot be read in place.
    """
    archive = TorchArchive(path)
    state = archive.obj
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise InputError(f"{path} does not hold a state dict (a mapping of tensor names to tensors).")
    out = {}
    for name, ref in state.items():
        if not isinstance(ref, TensorRef):
            raise InputError(f"Entry {brief(name)} of {path} is a {type(ref).__name__}, not a tensor.")
        out[name] = archive.tensor_info(name, ref)
    return out
