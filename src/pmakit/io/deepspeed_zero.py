"""Reading DeepSpeed ZeRO checkpoints (``global_stepN/``) without torch, DeepSpeed or a process group.

A ZeRO checkpoint folder holds, per data-parallel rank, ``*_optim_states.pt`` (``torch.save``
archives) whose ``optimizer_state_dict`` carries that rank's flat fp32 master partitions, and
``*_model_states.pt`` with ``param_shapes`` (each parameter group's names and shapes, in flat
order), ``shared_params`` (tied names), buffers in ``module`` and frozen parameters:

- ZeRO-1/2 (``single_partition_of_fp32_groups``): per group, the ranks' partitions concatenated
  in rank order form one flat vector; the parameters lie in it back to back (plus any
  ``param_alignment_paddings``), padding at the end.
- ZeRO-3 (``fp32_flat_groups``): every parameter is cut into ``ceil(numel / world)`` elements per
  rank; on each rank the parameters' slices lie back to back across its sub-group vectors.

Each parameter becomes a :class:`~pmakit.io.safetensors.TensorInfo` whose ``pieces`` are byte
ranges of the ranks' files (see :mod:`pmakit.io.torch_pickle`). The same layout holds for any
optimizer state that shadows the partitions, such as PMA's ``pma_avg``.

Every rank's files are checked, not rank 0's alone (:mod:`pmakit.io.archive`): the stage and rank
count agree, each partition is an fp32 vector (the cuts count 4-byte elements), and every field
(``partition_count``, ``zero_stage``, ``param_shapes``, paddings...) has its type and range.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, brief
from .archive import as_count, as_counts, as_list, as_mapping, as_text
from .safetensors import DTYPES, Piece, TensorInfo
from .torch_pickle import TorchArchive
from .torch_unpickler import TensorRef


__all__ = ["ZeroCheckpoint", "find_zero_folder"]

_FP32_KEYS = {1: "single_partition_of_fp32_groups", 2: "single_partition_of_fp32_groups", 3: "fp32_flat_groups"}
_F32 = DTYPES["F32"].itemsize


def _natural(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def find_zero_folder(folder: str | os.PathLike) -> Path | None:
    """The ZeRO folder of a checkpoint: the tag named by ``latest``, else its one ``global_step*``
    subfolder, or the folder itself when it holds ``*_optim_states.pt`` files; ``None`` if none."""
    folder = Path(folder)
    if any(folder.glob("*_optim_states.pt")):
        return folder
    latest = folder / "latest"
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8").strip()
        if tag and "/" not in tag and tag not in (".", "..") and any((folder / tag).glob("*_optim_states.pt")):
            return folder / tag
    found = [p for p in folder.glob("global_step*") if p.is_dir() and any(p.glob("*_optim_states.pt"))]
    if len(found) > 1:
        raise InputError(
            f"{folder} holds several DeepSpeed checkpoints ({', '.join(sorted(p.name for p in found))}) "
            "and no `latest` file naming one."
        )
    return found[0] if found else None


@dataclass(frozen=True)
class _Segment:
    """``count`` elements of a rank's flat vector, from position ``first``, at ``start`` in ``file``."""

    first: int
    count: int
    file: Path
    start: int


class ZeroCheckpoint:
    """The layout of one ZeRO checkpoint folder; :meth:`tensors` locates the weights or a shadow state.

    Raises:
        InputError: missing rank files, an unknown stage, a refused pickle, or an inconsistent layout.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        optim_files = sorted(self.folder.glob("*_optim_states.pt"), key=_natural)
        model_files = sorted(self.folder.glob("*_model_states.pt"), key=_natural)
        if not optim_files or not model_files:
            raise InputError(
                f"{self.folder} is not a DeepSpeed ZeRO checkpoint (*_optim_states.pt, *_model_states.pt)."
            )
        self.optim = [TorchArchive(f) for f in optim_files]
        self.model = TorchArchive(model_files[0])
        self.states = [self._optimizer_state(a) for a in self.optim]
        self.stage = self._same("zero_stage", _stage)
        self.world = self._same("partition_count", _world)
        if self.world != len(optim_files):
            raise InputError(
                f"{self.folder} was saved by {self.world} ranks but holds {len(optim_files)} *_optim_states.pt files."
            )
        self.shapes = self._param_shapes()
        self.paddings = self._paddings(self.states[0].get("param_alignment_paddings"))

    def _optimizer_state(self, archive: TorchArchive) -> dict:
        obj = archive.obj
        state = obj.get("optimizer_state_dict") if isinstance(obj, dict) else None
        if not isinstance(state, dict):
            raise InputError(f"{archive.label} has no `optimizer_state_dict`; is it a DeepSpeed checkpoint?")
        return state

    def _same(self, field: str, parse) -> int:
        """``field`` of every rank's optimizer state, parsed and checked; all ranks must agree."""
        values = [parse(s.get(field), f"{a.label}: `{field}`") for a, s in zip(self.optim, self.states, strict=True)]
        if len(set(values)) > 1:
            each = ", ".join(f"{brief(v)} in {a.path.name}" for a, v in zip(self.optim, values, strict=True))
            raise InputError(f"{self.folder}: the ranks disagree on `{field}` ({each}).")
        return values[0]

    def _param_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        groups = self.model.obj.get("param_shapes") if isinstance(self.model.obj, dict) else None
        if groups is None:
            raise InputError(f"{self.model.label} has no `param_shapes`; it is not a ZeRO model-states file.")
        where = f"{self.model.label}: `param_shapes`"
        out = []
        for g, group in enumerate(as_list(groups, where)):
            shapes = as_mapping(group, f"{where}[{g}]")
            out.append(
                {as_text(k, f"{where}[{g}] key"): as_counts(v, f"{where}[{g}][{brief(k)}]") for k, v in shapes.items()}
            )
        return out

    def _paddings(self, paddings) -> list[tuple[int, ...]] | None:
        """``param_alignment_paddings``: per group, one count per parameter (ZeRO-1/2), or none."""
        if not paddings:
            return None
        where = f"{self.optim[0].label}: `param_alignment_paddings`"
        out = [as_counts(p, f"{where}[{g}]") for g, p in enumerate(as_list(paddings, where))]
        if len(out) < len(self.shapes) or any(len(p) < len(s) for p, s in zip(out, self.shapes, strict=False)):
            raise InputError(f"{where} must give one padding per parameter of each of the {len(self.shapes)} groups.")
        return out

    def _vectors(self, rank: int, key: str | None) -> list[TensorInfo]:
        """Rank ``rank``'s flat vectors, one per (sub-)group: the fp32 masters, or state ``key`` of each."""
        archive, state = self.optim[rank], self.states[rank]
        if key is None:
            refs = state.get(_FP32_KEYS[self.stage])
        else:
            base = state.get("base_optimizer_state", state.get("optimizer_state_dict", {}))  # ZeRO-1/2, ZeRO-3
            entries = as_mapping(base.get("state", {}) if isinstance(base, dict) else {}, f"{archive.label}: `state`")
            order = sorted(as_count(i, f"{archive.label}: a key of `state`") for i in entries)
            refs = [entries[i].get(key) if isinstance(entries[i], dict) else None for i in order]
        what = f"`{key}` in its optimizer state" if key else f"`{_FP32_KEYS[self.stage]}`"
        if not refs or not isinstance(refs, (list, tuple)) or not all(isinstance(r, TensorRef) for r in refs):
            raise InputError(f"{archive.label} holds no {what}.")
        vectors = [archive.tensor_info(f"{key or 'fp32'}[{i}]", r) for i, r in enumerate(refs)]
        for i, info in enumerate(vectors):  # every rank: the cuts count 4-byte elements
            if info.dtype != "F32":
                raise InputError(
                    f"{archive.label}: partition {i} of {what} is {info.dtype}; fp32 partitions were expected "
                    "(read as fp32, its bytes would give wrong weights)."
                )
        return vectors

    def tensors(self, key: str | None = None) -> dict[str, TensorInfo]:
        """Every trainable parameter by name: the fp32 master weights, or (``key``, e.g. ``"pma_avg"``)
        the optimizer state that shadows them. Tied names (``shared_params``) point at the same bytes."""
        vectors = [self._vectors(r, key) for r in range(self.world)]
        out = self._stage3(vectors) if self.stage == 3 else self._stage12(vectors)
        if key is None:
            out.update(self._frozen_and_buffers())
        for name, source in self._shared():
            if source in out:
                out[name] = _renamed(out[source], name)
        return out

    def _shared(self) -> list[tuple[str, str]]:
        """``shared_params``: (tied name, the name it shares), a mapping or a list of pairs."""
        where = f"{self.model.label}: `shared_params`"
        shared = self.model.obj.get("shared_params") or {}
        pairs = shared.items() if isinstance(shared, dict) else as_list(shared, where)
        out = []
        for pair in pairs:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise InputError(f"{where} must hold (name, source name) pairs, got {brief(pair)}.")
            out.append((as_text(pair[0], f"{where} name"), as_text(pair[1], f"{where} source")))
        return out

    def _frozen_and_buffers(self) -> dict[str, TensorInfo]:
        """Buffers (kept whole in ``module``) and frozen parameters (whole under ZeRO-1/2)."""
        obj, label = self.model.obj, self.model.label
        module = as_mapping(obj.get("module") or {}, f"{label}: `module`")
        buffers = as_list(obj.get("buffer_names") or (), f"{label}: `buffer_names`")
        wanted = {as_text(n, f"{label}: `buffer_names`"): module.get(n) for n in buffers}
        frozen = as_mapping(obj.get("frozen_param_shapes") or {}, f"{label}: `frozen_param_shapes`")
        if frozen and self.stage == 3:
            raise InputError(
                f"{self.folder} has frozen parameters ({brief(next(iter(frozen)))}, ...) partitioned by ZeRO-3; "
                "they are not read."
            )
        fragments = as_mapping(obj.get("frozen_param_fragments") or {}, f"{label}: `frozen_param_fragments`")
        wanted.update({as_text(n, f"{label}: `frozen_param_fragments`"): t for n, t in fragments.items()})
        out = {}
        for name, ref in wanted.items():
            if not isinstance(ref, TensorRef):
                raise InputError(f"{label} lists {brief(name)} but holds no tensor for it.")
            out[name] = self.model.tensor_info(name, ref)
        return out

    def _stage12(self, vectors: list[list[TensorInfo]]) -> dict[str, TensorInfo]:
        out: dict[str, TensorInfo] = {}
        if any(len(v) != len(self.shapes) for v in vectors):
            raise InputError(f"{self.folder}: the ranks' partitions do not match the {len(self.shapes)} groups.")
        for g, shapes in enumerate(self.shapes):
            segments, position = [], 0
            for rank in vectors:
                info = rank[g]
                segments.append(_Segment(position, info.numel, info.file, info.start))
                position += info.numel
            offset = 0
            for k, (name, shape) in enumerate(shapes.items()):
                numel = _numel(shape)
                out[name] = _tensor(name, vectors[0][g], shape, _cut(segments, offset, numel, 0))
                offset += numel + (self.paddings[g][k] if self.paddings else 0)
            if offset > position:
                raise InputError(
                    f"{self.folder}: group {g} needs {offset} elements but its partitions hold {position}."
                )
        return out

    def _stage3(self, vectors: list[list[TensorInfo]]) -> dict[str, TensorInfo]:
        ranks = []
        for rank in vectors:
            segments, position = [], 0
            for info in rank:
                segments.append(_Segment(position, info.numel, info.file, info.start))
                position += info.numel
            ranks.append((segments, position))
        out: dict[str, TensorInfo] = {}
        offset = 0
        for name, shape in ((n, s) for group in self.shapes for n, s in group.items()):
            numel = _numel(shape)
            share = -(-numel // self.world)
            pieces: list[Piece] = []
            for r, (segments, position) in enumerate(ranks):
                first, count = r * share, max(0, min(numel, (r + 1) * share) - r * share)
                if count and offset + count > position:
                    raise InputError(f"{self.folder}: rank {r}'s partition ends before parameter {brief(name)}.")
                pieces += _cut(segments, offset, count, first) if count else []
            out[name] = _tensor(name, vectors[0][0], shape, pieces)
            offset += share
        return out


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _stage(value, where: str) -> int:
    """``zero_stage``: 1, 2 or 3 (DeepSpeed pickles its enum as the int)."""
    stage = as_count(value, where)
    if stage not in _FP32_KEYS:
        raise InputError(f"{where} is {stage}; only ZeRO stage 1-3 checkpoints are read.")
    return stage


def _world(value, where: str) -> int:
    """``partition_count``: the data-parallel ranks (one count, or one per group under ZeRO-1/2)."""
    counts = as_counts(value, where) if isinstance(value, (list, tuple)) else (as_count(value, where),)
    if not counts or min(counts) < 1:
        raise _positive(where, value)
    return max(counts)


def _positive(where: str, value) -> InputError:
    return InputError(f"{where} must be a positive rank count, got {brief(value)}.")


def _cut(segments: list[_Segment], begin: int, count: int, first: int) -> list[Piece]:
    """Elements ``[begin, begin + count)`` of a vector made of ``segments``, as pieces from element ``first``."""
    pieces, end = [], begin + count
    for s in segments:
        lo, hi = max(begin, s.first), min(end, s.first + s.count)
        if lo < hi:
            pieces.append(Piece(first + lo - begin, hi - lo, s.file, s.start + (lo - s.first) * _F32))
    if sum(p.count for p in pieces) != count:
        raise InputError(f"A ZeRO partition ends before element {end} of its flat vector.")
    return pieces


def _tensor(name: str, vector: TensorInfo, shape: tuple[int, ...], pieces: list[Piece]) -> TensorInfo:
    """Parameter ``name`` cut from flat vectors like ``vector`` (fp32: the master weights and their shadows)."""
    if vector.dtype != "F32":
        raise InputError(
            f"ZeRO tensor {brief(name)} is {vector.dtype} in {vector.file}; fp32 partitions were expected."
        )
    if not pieces:  # an empty parameter
        return TensorInfo(name, "F32", shape, vector.file, vector.start, 0)
    return TensorInfo(name, "F32", shape, pieces[0].file, pieces[0].start, _numel(shape) * _F32, tuple(pieces))


def _renamed(info: TensorInfo, name: str) -> TensorInfo:
    return TensorInfo(name, info.dtype, info.shape, info.file, info.start, info.nbytes, info.pieces)
