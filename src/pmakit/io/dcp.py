"""Reading ``torch.distributed.checkpoint`` (DCP) folders without torch and without a process group.

A DCP folder (what FSDP's ``SHARDED_STATE_DICT`` saves, e.g. Accelerate's
``checkpoint-N/pytorch_model_fsdp_0/``) holds ``.metadata``, a pickle of DCP's ``Metadata``: for
every tensor its global size, dtype and the chunks (offsets, sizes) the ranks wrote; for every
chunk the ``.distcp`` file, byte offset and length of its ``torch.save`` blob; and, in
``planner_data``, the path of keys each flattened name came from (``("model", "lm_head.weight")``).

Each chunk blob is read with :class:`~pmakit.io.torch_pickle.TorchArchive` into a byte range of
its ``.distcp`` file, and a tensor becomes a :class:`~pmakit.io.safetensors.TensorInfo` whose
``pieces`` are those ranges in element order. FSDP shards along dimension 0, so every chunk is a
run of whole rows; chunks cut along other dimensions (tensor parallelism) are refused by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .safetensors import DTYPES, ITEMSIZES, Piece, TensorInfo
from .torch_pickle import MetadataIndex, Record, TensorRef, TorchArchive, TorchDtype, read_pickle


__all__ = ["METADATA_FILE", "DcpCheckpoint", "DcpTensor", "is_dcp_folder"]

METADATA_FILE = ".metadata"


def is_dcp_folder(folder: str | os.PathLike) -> bool:
    """A folder written by ``torch.distributed.checkpoint`` (it has ``.metadata`` and ``*.distcp`` files)."""
    folder = Path(folder)
    return (folder / METADATA_FILE).is_file() and any(folder.glob("*.distcp"))


@dataclass(frozen=True)
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: Path
    start: int
    length: int


@dataclass(frozen=True)
class DcpTensor:
    """One tensor of a DCP checkpoint: its key path, dtype, global shape and stored chunks."""

    fqn: str
    path: tuple[str, ...]
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[_Chunk, ...]


class DcpCheckpoint:
    """The validated ``.metadata`` of a DCP folder; tensors are located on demand (:meth:`tensor_info`).

    Raises:
        InputError: the metadata is missing, refused by the allow-list, or inconsistent.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        meta_file = self.folder / METADATA_FILE
        try:
            raw = meta_file.read_bytes()
        except OSError as e:
            raise InputError(f"Cannot read {meta_file}: {e.strerror or e}.") from e
        meta = read_pickle(raw, str(meta_file))
        if not isinstance(meta, Record) or not isinstance(getattr(meta, "state_dict_metadata", None), dict):
            raise InputError(f"{meta_file} is not DCP metadata (no `state_dict_metadata`).")
        self.tensors: dict[str, DcpTensor] = {}
        storage = getattr(meta, "storage_data", None) or {}
        paths = getattr(meta, "planner_data", None) or {}
        for fqn, entry in meta.state_dict_metadata.items():
            if entry.qualname.endswith("TensorStorageMetadata"):
                self.tensors[fqn] = self._tensor(fqn, entry, storage, paths.get(fqn, (fqn,)))

    def _tensor(self, fqn: str, entry: Record, storage: dict, path) -> DcpTensor:
        dtype = entry.properties.state[0] if isinstance(entry.properties.state, tuple) else None
        if not isinstance(dtype, TorchDtype) or dtype not in DTYPES:
            raise InputError(f"Tensor {fqn!r} of {self.folder} has an unsupported dtype {dtype!r}.")
        chunks = []
        for chunk in entry.chunks:
            offsets = tuple(int(o) for o in chunk.offsets)
            info = storage.get(_index_key(fqn, offsets))
            if info is None:
                raise InputError(f"{self.folder}/{METADATA_FILE} has no storage entry for {fqn!r} at {list(offsets)}.")
            if getattr(info, "transform_descriptors", None):
                raise InputError(
                    f"Tensor {fqn!r} of {self.folder} is stored with transforms {list(info.transform_descriptors)} "
                    "(e.g. compression); only plain DCP checkpoints are read."
                )
            file = self.folder / _plain_name(str(info.relative_path), self.folder)
            sizes = tuple(int(s) for s in chunk.sizes)
            chunks.append(_Chunk(offsets, sizes, file, int(info.offset), int(info.length)))
        names = tuple(str(p) for p in (path if isinstance(path, (tuple, list)) else (path,)))
        return DcpTensor(fqn, names, str(dtype), tuple(int(s) for s in entry.size), tuple(chunks))

    def tensor_info(self, fqn: str, name: str | None = None) -> TensorInfo:
        """Tensor ``fqn`` as pieces of its ``.distcp`` files, named ``name`` (default ``fqn``).

        Raises:
            InputError: a chunk is not a run of whole rows, its blob disagrees with the metadata,
                or the chunks do not tile the tensor exactly.
        """
        tensor = self.tensors[fqn]
        name = name or fqn
        row = 1
        for d in tensor.shape[1:]:
            row *= d
        pieces = sorted((self._piece(tensor, chunk, row) for chunk in tensor.chunks), key=lambda p: p.first)
        numel = row * (tensor.shape[0] if tensor.shape else 1)
        position = 0
        for p in pieces:
            if p.first != position:
                raise InputError(f"The chunks of tensor {fqn!r} in {self.folder} leave a gap or overlap at {p.first}.")
            position += p.count
        if position != numel:
            raise InputError(f"The chunks of tensor {fqn!r} in {self.folder} cover {position} of {numel} elements.")
        itemsize = ITEMSIZES[tensor.dtype]
        if not pieces:  # an empty tensor
            return TensorInfo(name, tensor.dtype, tensor.shape, self.folder / METADATA_FILE, 0, 0)
        return TensorInfo(
            name, tensor.dtype, tensor.shape, pieces[0].file, pieces[0].start, numel * itemsize, tuple(pieces)
        )

    def _piece(self, tensor: DcpTensor, chunk: _Chunk, row: int) -> Piece:
        if chunk.offsets[1:] != (0,) * (len(chunk.offsets) - 1) or chunk.sizes[1:] != tensor.shape[1:]:
            raise InputError(
                f"Tensor {tensor.fqn!r} of {self.folder} is split along a dimension other than the first "
                f"(chunk at {list(chunk.offsets)} of size {list(chunk.sizes)}); only FSDP-style row shards are read."
            )
        archive = TorchArchive(chunk.file, chunk.start, chunk.length)
        ref = archive.obj
        if not isinstance(ref, TensorRef) or ref.shape != chunk.sizes or ref.dtype != tensor.dtype:
            raise InputError(
                f"The chunk of {tensor.fqn!r} at {list(chunk.offsets)} in {archive.label} does not hold a "
                f"{tensor.dtype}{list(chunk.sizes)} tensor."
            )
        info = archive.tensor_info(tensor.fqn, ref)
        first = chunk.offsets[0] * row if chunk.offsets else 0
        return Piece(first, ref.numel, info.file, info.start)


def _index_key(fqn: str, offsets: tuple[int, ...]) -> MetadataIndex:
    key = MetadataIndex()
    key.__setstate__({"fqn": fqn, "offset": offsets, "index": None})
    return key


def _plain_name(name: str, folder: Path) -> str:
    """A ``.distcp`` file named by the metadata: a plain file name inside the folder (no ``..``, no path)."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise InputError(f"{folder}/{METADATA_FILE} names a data file {name!r} outside its folder.")
    return name
