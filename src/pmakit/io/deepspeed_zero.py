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
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .safetensors import Piece, TensorInfo
from .torch_pickle import TensorRef, TorchArchive


__all__ = ["ZeroCheckpoint", "find_zero_folder"]

_FP32_KEYS = {1: "single_partition_of_fp32_groups", 2: "single_partition_of_fp32_groups", 3: "fp32_flat_groups"}


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
        states = [self._optimizer_state(a) for a in self.optim]
        self.stage = int(states[0].get("zero_stage", 0))
        if self.stage not in _FP32_KEYS:
            raise InputError(f"{optim_files[0]} is not a ZeRO stage 1-3 checkpoint (zero_stage={self.stage}).")
        count = states[0].get("partition_count")
        self.world = max(count) if isinstance(count, (list, tuple)) else int(count or 0)
        if self.world != len(optim_files):
            raise InputError(
                f"{self.folder} was saved by {self.world} ranks but holds {len(optim_files)} *_optim_states.pt files."
            )
        self.states = states
        self.shapes = self._param_shapes()
        self.paddings = states[0].get("param_alignment_paddings")

    def _optimizer_state(self, archive: TorchArchive) -> dict:
        obj = archive.obj
        state = obj.get("optimizer_state_dict") if isinstance(obj, dict) else None
        if not isinstance(state, dict):
            raise InputError(f"{archive.label} has no `optimizer_state_dict`; is it a DeepSpeed checkpoint?")
        return state

    def _param_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        groups = self.model.obj.get("param_shapes") if isinstance(self.model.obj, dict) else None
        if not isinstance(groups, (list, tuple)) or not all(isinstance(g, dict) for g in groups):
            raise InputError(f"{self.model.label} has no `param_shapes`; it is not a ZeRO model-states file.")
        return [{str(k): tuple(int(d) for d in v) for k, v in g.items()} for g in groups]

    def _vectors(self, rank: int, key: str | None) -> list[TensorInfo]:
        """Rank ``rank``'s flat vectors, one per (sub-)group: the fp32 masters, or state ``key`` of each."""
        archive, state = self.optim[rank], self.states[rank]
        if key is None:
            refs = state.get(_FP32_KEYS[self.stage])
        else:
            base = state.get("base_optimizer_state", state.get("optimizer_state_dict", {}))  # ZeRO-1/2, ZeRO-3
            entries = base.get("state", {}) if isinstance(base, dict) else {}
            refs = [entries[i].get(key) if isinstance(entries.get(i), dict) else None for i in sorted(entries)]
        if not refs or not all(isinstance(r, TensorRef) for r in refs):
            what = f"`{key}` in its optimizer state" if key else f"`{_FP32_KEYS[self.stage]}`"
            raise InputError(f"{archive.label} holds no {what}.")
        return [archive.tensor_info(f"{key or 'fp32'}[{i}]", r) for i, r in enumerate(refs)]

    def tensors(self, key: str | None = None) -> dict[str, TensorInfo]:
        """Every trainable parameter by name: the fp32 master weights, or (``key``, e.g. ``"pma_avg"``)
        the optimizer state that shadows them. Tied names (``shared_params``) point at the same bytes."""
        vectors = [self._vectors(r, key) for r in range(self.world)]
        out = self._stage3(vectors) if self.stage == 3 else self._stage12(vectors)
        if key is None:
            out.update(self._frozen_and_buffers())
        shared = self.model.obj.get("shared_params") or {}
        for name, source in shared.items() if isinstance(shared, dict) else shared:
            if source in out:
                out[str(name)] = _renamed(out[source], str(name))
        return out

    def _frozen_and_buffers(self) -> dict[str, TensorInfo]:
        """Buffers (kept whole in ``module``) and frozen parameters (whole under ZeRO-1/2)."""
        obj = self.model.obj
        module = obj.get("module") or {}
        wanted = {str(n): module.get(n) for n in obj.get("buffer_names") or ()}
        frozen = obj.get("frozen_param_shapes") or {}
        if frozen and self.stage == 3:
            raise InputError(
                f"{self.folder} has frozen parameters ({next(iter(frozen))!r}, ...) partitioned by ZeRO-3; "
                "they are not read."
            )
        wanted.update({str(n): t for n, t in (obj.get("frozen_param_fragments") or {}).items()})
        out = {}
        for name, ref in wanted.items():
            if not isinstance(ref, TensorRef):
                raise InputError(f"{self.model.label} lists {name!r} but holds no tensor for it.")
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
                offset += numel + (int(self.paddings[g][k]) if self.paddings else 0)
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
                    raise InputError(f"{self.folder}: rank {r}'s partition ends before parameter {name!r}.")
                pieces += _cut(segments, offset, count, first) if count else []
            out[name] = _tensor(name, vectors[0][0], shape, pieces)
            offset += share
        return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _cut(segments: list[_Segment], begin: int, count: int, first: int) -> list[Piece]:
    """Elements ``[begin, begin + count)`` of a vector made of ``segments``, as pieces from element ``first``."""
    pieces, end = [], begin + count
    for s in segments:
        lo, hi = max(begin, s.first), min(end, s.first + s.count)
        if lo < hi:
            pieces.append(Piece(first + lo - begin, hi - lo, s.file, s.start + (lo - s.first) * 4))
    if sum(p.count for p in pieces) != count:
        raise InputError(f"A ZeRO partition ends before element {end} of its flat vector.")
    return pieces


def _tensor(name: str, vector: TensorInfo, shape: tuple[int, ...], pieces: list[Piece]) -> TensorInfo:
    """Parameter ``name`` cut from flat vectors like ``vector`` (fp32: the master weights and their shadows)."""
    if vector.dtype != "F32":
        raise InputError(f"ZeRO tensor {name!r} is {vector.dtype} in {vector.file}; fp32 partitions were expected.")
    if not pieces:  # an empty parameter
        return TensorInfo(name, "F32", shape, vector.file, vector.start, 0)
    return TensorInfo(name, "F32", shape, pieces[0].file, pieces[0].start, _numel(shape) * 4, tuple(pieces))


def _renamed(info: TensorInfo, name: str) -> TensorInfo:
    return TensorInfo(name, info.dtype, info.shape, info.file, info.start, info.nbytes, info.pieces)
