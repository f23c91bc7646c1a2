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
Every field of the metadata is checked (:mod:`pmakit.io.archive`): a wrong type or range is an
:class:`~pmakit.errors.InputError` naming ``.metadata`` and the field.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, brief
from .archive import as_count, as_counts, as_list, as_mapping, as_text
from .safetensors import DTYPES, ITEMSIZES, Piece, TensorInfo
from .torch_pickle import TorchArchive
from .torch_unpickler import MetadataIndex, Record, TensorRef, TorchDtype, read_pickle


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
        self.meta_file = meta_file
        self.tensors: dict[str, DcpTensor] = {}
        storage = as_mapping(getattr(meta, "storage_data", None) or {}, f"{meta_file}: `storage_data`")
        paths = as_mapping(getattr(meta, "planner_data", None) or {}, f"{meta_file}: `planner_data`")
        for fqn, entry in meta.state_dict_metadata.items():
            where = f"{meta_file}: `state_dict_metadata[{brief(fqn)}]"  # + the field's path and a closing `
            fqn = as_text(fqn, f"{meta_file}: a key of `state_dict_metadata`")
            if not isinstance(entry, Record):
                raise InputError(f"{where}` must be DCP storage metadata, got {brief(entry)}.")
            if type(entry).qualname.endswith("TensorStorageMetadata"):
                path = paths.get(fqn, (fqn,))
                path = path if isinstance(path, (tuple, list)) else (path,)
                self.tensors[fqn] = self._tensor(fqn, entry, storage, path, where)

    def _tensor(self, fqn: str, entry: Record, storage: dict, path, where: str) -> DcpTensor:
        state = getattr(getattr(entry, "properties", None), "state", None)
        dtype = state[0] if isinstance(state, tuple) and state else None
        if not isinstance(dtype, TorchDtype) or dtype not in DTYPES:
            raise InputError(f"{where}.properties.dtype` is an unsupported dtype {brief(dtype)}.")
        chunks = []
        for i, chunk in enumerate(as_list(getattr(entry, "chunks", None), f"{where}.chunks`")):
            offsets = as_counts(getattr(chunk, "offsets", None), f"{where}.chunks[{i}].offsets`")
            sizes = as_counts(getattr(chunk, "sizes", None), f"{where}.chunks[{i}].sizes`")
            info = storage.get(_index_key(fqn, offsets))
            if info is None:
                raise InputError(f"{self.meta_file} has no storage entry for {brief(fqn)} at {brief(list(offsets))}.")
            at = f"{self.meta_file}: `storage_data[{brief(fqn)} at {brief(list(offsets))}]"
            if getattr(info, "transform_descriptors", None):
                raise InputError(
                    f"Tensor {brief(fqn)} of {self.folder} is stored with transforms "
                    f"{brief(info.transform_descriptors)} (e.g. compression); only plain DCP checkpoints are read."
                )
            file = self.folder / _plain_name(as_text(getattr(info, "relative_path", None), f"{at}.relative_path`"), at)
            start = as_count(getattr(info, "offset", None), f"{at}.offset`")
            chunks.append(
                _Chunk(offsets, sizes, file, start, as_count(getattr(info, "length", None), f"{at}.length`"))
            )
        names = tuple(_key_name(p, f"{self.meta_file}: `planner_data[{brief(fqn)}]`") for p in as_list(path, ""))
        return DcpTensor(
            fqn, names, str(dtype), as_counts(getattr(entry, "size", None), f"{where}.size`"), tuple(chunks)
        )

    def tensor_info(self, fqn: str, name: str | None = None) -> TensorInfo:
        """Tensor ``fqn`` as pieces of its ``.distcp`` files, named ``name`` (default ``fqn``).

        Raises:
            InputError: a chunk is not a run of whole rows, its blob disagrees with the metadata,
                or the chunks do not tile the tensor exactly.
        """
        tensor = self.tensors[fqn]
        name = name or fqn
        row = math.prod(tensor.shape[1:])
        pieces = sorted((self._piece(tensor, chunk, row) for chunk in tensor.chunks), key=lambda p: p.first)
        numel = row * (tensor.shape[0] if tensor.shape else 1)
        position = 0
        for p in pieces:
            if p.first != position:
                raise InputError(
                    f"The chunks of tensor {brief(fqn)} in {self.folder} leave a gap or overlap at {p.first}."
                )
            position += p.count
        if position != numel:
            raise InputError(
                f"The chunks of tensor {brief(fqn)} in {self.folder} cover {position} of {numel} elements."
            )
        itemsize = ITEMSIZES[tensor.dtype]
        if not pieces:  # an empty tensor
            return TensorInfo(name, tensor.dtype, tensor.shape, self.folder / METADATA_FILE, 0, 0)
        return TensorInfo(
            name, tensor.dtype, tensor.shape, pieces[0].file, pieces[0].start, numel * itemsize, tuple(pieces)
        )

    def _piece(self, tensor: DcpTensor, chunk: _Chunk, row: int) -> Piece:
        rank = len(tensor.shape)
        if len(chunk.offsets) != rank or len(chunk.sizes) != rank:
            raise InputError(
                f"{self.meta_file}: a chunk of {brief(tensor.fqn)} has offsets {brief(list(chunk.offsets))} and "
                f"sizes {brief(list(chunk.sizes))} for a tensor of shape {brief(list(tensor.shape))}."
            )
        if chunk.offsets[1:] != (0,) * (rank - 1) or chunk.sizes[1:] != tensor.shape[1:]:
            raise InputError(
                f"Tensor {brief(tensor.fqn)} of {self.folder} is split along a dimension other than the first "
                f"(chunk at {brief(list(chunk.offsets))} of size {brief(list(chunk.sizes))}); only FSDP-style "
                "row shards are read."
            )
        archive = TorchArchive(chunk.file, chunk.start, chunk.length)
        ref = archive.obj
        if not isinstance(ref, TensorRef) or ref.shape != chunk.sizes or ref.dtype != tensor.dtype:
            raise InputError(
                f"The chunk of {brief(tensor.fqn)} at {brief(list(chunk.offsets))} in {archive.label} does not hold a "
                f"{tensor.dtype}{brief(list(chunk.sizes))} tensor."
            )
        info = archive.tensor_info(tensor.fqn, ref)
        first = chunk.offsets[0] * row if chunk.offsets else 0
        return Piece(first, ref.numel, info.file, info.start)


def _index_key(fqn: str, offsets: tuple[int, ...]) -> MetadataIndex:
    key = MetadataIndex()
    key.__setstate__({"fqn": fqn, "offset": offsets, "index": None})
    return key


def _key_name(key: object, where: str) -> str:
    """One key of a tensor's path in the saved state dict: a name, or a list index."""
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise InputError(f"{where} must be a path of names, got {brief(key)}.")
    return str(key)


def _plain_name(name: str, where: str) -> str:
    """A ``.distcp`` file named by the metadata: a plain file name inside the folder (no ``..``, no path)."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise InputError(f"{where}.relative_path` names a data file {brief(name)} outside its folder.")
    return name
