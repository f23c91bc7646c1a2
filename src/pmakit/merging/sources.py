"""Where merge inputs come from: model folders, run folders (``checkpoint-N`` / ``pma-N``), Hub ids.

Everything that turns what a user wrote into a list of local weight files goes through
:func:`resolve_inputs`, so tools that read the same inputs (``pmakit inspect``, diagnostics)
see exactly what a merge would read.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MergeError, brief


if TYPE_CHECKING:
    from ..io.safetensors import TensorInfo


__all__ = [
    "KINDS",
    "PMA_STATE",
    "CheckpointInfo",
    "ModelSource",
    "is_run_dir",
    "list_checkpoints",
    "parse_hub_reference",
    "resolve_inputs",
    "resolve_source",
    "select_checkpoints",
]

PMA_STATE = "pma-state"  # checkpoint-N folders, read for the PMA average in their optimizer state
KINDS = ("checkpoint", "pma", PMA_STATE)
_STEP_DIR = re.compile(r"^(checkpoint|pma)-(\d+)$")
_SAMPLE_DIR = re.compile(r"^(step)-(\d+)$")  # pma-samples/step-N: a step, but not a run folder's checkpoint
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass
class CheckpointInfo:
    """A ``checkpoint-N`` or ``pma-N`` folder of a run."""

    path: Path
    kind: str  # "checkpoint" or "pma"
    step: int

    @property
    def size(self) -> int:
        """Bytes of weight files in the folder: safetensors, pickled ``.bin``, FSDP DCP shards."""
        patterns = ("*.safetensors", "pytorch_model*.bin", "pytorch_model_fsdp*/*.distcp")
        return sum(f.stat().st_size for pattern in patterns for f in self.path.glob(pattern))


@dataclass
class ModelSource:
    """One merge input, resolved to a local folder and its weight files."""

    name: str  # as the user gave it (path or Hub id[@revision])
    path: Path
    step: int | None = None
    hub_id: str | None = None
    revision: str | None = None
    files: list[Path] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    is_adapter: bool = False
    state: str = "weights"  # "pma": the PMA average stored in the checkpoint's optimizer state

    @property
    def label(self) -> str:
        return self.hub_id + (f"@{self.revision}" if self.revision else "") if self.hub_id else str(self.path)

    def load(self, allow_pickle: bool = False, scratch: Path | None = None) -> ModelSource:
        """Locate every tensor (safetensors, DCP or pickled ``.bin``; ``state="pma"``: the stored PMA
        average) and read ``config.json``. ``scratch`` is unused: nothing is converted any more."""
        from .checkpoints import read_checkpoint_tensors  # numpy: not needed to build the command line's parser

        self.files, self.tensors = read_checkpoint_tensors(self.path, state=self.state, allow_pickle=allow_pickle)
        self.is_adapter = any(f.name.startswith("adapter_model") for f in self.files)
        config = self.path / ("adapter_config.json" if self.is_adapter else "config.json")
        if config.is_file():
            try:
                self.config = json.loads(config.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise MergeError(f"{config} is not valid JSON: {e}.") from e
        return self


def parse_hub_reference(text: str) -> tuple[str, str | None] | None:
    """``"owner/name@rev"`` -> ``("owner/name", "rev")``; ``None`` when it is a local path or not an id."""
    if os.path.exists(text) or not _HUB_ID.match(text):
        return None
    repo, _, revision = text.partition("@")
    return repo, revision or None


def is_run_dir(folder: str | os.PathLike) -> bool:
    """A training run folder: no weights of its own, but ``checkpoint-N`` or ``pma-N`` subfolders."""
    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.safetensors")) or (folder / "config.json").is_file():
        return False
    return any(_STEP_DIR.match(p.name) and p.is_dir() for p in folder.iterdir())


def list_checkpoints(run_dir: str | os.PathLike, kind: str = "checkpoint") -> list[CheckpointInfo]:
    """``checkpoint-N`` (``kind="checkpoint"``) or ``pma-N`` (``kind="pma"``) folders, oldest first."""
    if kind not in ("checkpoint", "pma"):
        raise MergeError(f"`kind` must be 'checkpoint' or 'pma', got {brief(kind)}.")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MergeError(f"Run folder {run_dir} does not exist.")
    found = []
    for p in run_dir.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and m.group(1) == kind and p.is_dir():
            found.append(CheckpointInfo(p, kind, int(m.group(2))))
    return sorted(found, key=lambda c: c.step)


def select_checkpoints(
    run_dir: str | os.PathLike,
    *,
    last: int | None = None,
    every: int | None = None,
    start: int | None = None,
    end: int | None = None,
    kind: str = "checkpoint",
) -> list[CheckpointInfo]:
    """Pick the paper's window from a run: steps in ``[start, end]``, then ``every`` V steps counted
    back from the newest of those, then the ``last`` N; oldest first (the averaging rules' order).
    """
    for name, value in (("last", last), ("every", every)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise MergeError(f"`{name}` must be a positive integer, got {brief(value)}.")
    if start is not None and end is not None and start > end:
        raise MergeError(f"The step range is empty: start={start} > end={end}.")
    found = list_checkpoints(run_dir, kind)
    if not found:
        raise MergeError(f"No {kind}-N folders in {run_dir}.")
    chosen = [c for c in found if (start is None or c.step >= start) and (end is None or c.step <= end)]
    if chosen and every is not None:
        newest = chosen[-1].step
        chosen = [c for c in chosen if (newest - c.step) % every == 0]
    if last is not None:
        chosen = chosen[-last:]
    if not chosen:
        steps = ", ".join(str(c.step) for c in found)
        raise MergeError(f"No {kind} of {run_dir} matches the selection (steps present: {steps}).")
    if last is not None and len(chosen) < last:
        warnings.warn(f"Asked for the last {last} {kind}s of {run_dir} but only {len(chosen)} match.", stacklevel=2)
    return chosen


def resolve_source(
    item: str | os.PathLike,
    *,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    step: int | None = None,
) -> ModelSource:
    """A model folder or Hub id (``owner/name[@revision]``, fetched through :mod:`pmakit.io.hub`)."""
    text = os.fspath(item)
    hub = parse_hub_reference(text)
    if hub is None:
        path = Path(text).expanduser()
        if not path.exists():
            raise MergeError(f"Input {text} is neither a local folder nor a Hub id of the form owner/name[@revision].")
        if not path.is_dir():
            raise MergeError(f"Input {text} is a file; give the model folder that holds it.")
        return ModelSource(text, path.resolve(), step=step if step is not None else _step_of(path))
    from ..io import hub as hub_api  # imported lazily: plain local merges need no network code

    repo, revision = hub
    try:
        path = Path(hub_api.download_model(repo, revision=revision, token=token, cache_dir=cache_dir))
    except hub_api.HubDownloadError as e:  # bad input: the CLI reports it in one line, exit code 2
        raise MergeError(
            f"Input {text} is not a local folder (no {Path(text).expanduser().absolute()}), and as a Hub id it "
            f"failed: {e}"
        ) from e
    return ModelSource(text, path, step=step, hub_id=repo, revision=revision)


def _state(kind: str) -> str:
    """What to read from each input: the weights, or (``kind="pma-state"``) the stored PMA average."""
    if kind not in KINDS:
        raise MergeError(f"`kind` must be one of {', '.join(map(repr, KINDS))}, got {brief(kind)}.")
    return "pma" if kind == PMA_STATE else "weights"


def _step_of(path: Path) -> int | None:
    """The training step a folder's name gives: ``checkpoint-N``, ``pma-N``, or a sample store's ``step-N``."""
    m = _STEP_DIR.match(path.name) or _SAMPLE_DIR.match(path.name)
    return int(m.group(2)) if m else None


def resolve_inputs(
    models: Sequence[str | os.PathLike] | None = None,
    *,
    run_dir: str | os.PathLike | None = None,
    last: int | None = None,
    every: int | None = None,
    start: int | None = None,
    end: int | None = None,
    kind: str = "checkpoint",
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> list[ModelSource]:
    """Inputs in merge order (oldest first): a run's selected checkpoints, or ``models`` as given.

    A single entry in ``models`` that is a run folder is treated like ``run_dir``. Weight files
    are not opened here (see :meth:`ModelSource.load`).
    """
    if run_dir is None and models and len(models) == 1 and is_run_dir(models[0]):
        run_dir, models = models[0], None
    if run_dir is not None:
        run_dir = Path(run_dir).expanduser()
        if models:
            raise MergeError("Give either `models` or `run_dir`, not both.")
        folders = "checkpoint" if kind == PMA_STATE else kind
        chosen = select_checkpoints(run_dir, last=last, every=every, start=start, end=end, kind=folders)
        return [ModelSource(str(c.path), c.path.resolve(), step=c.step, state=_state(kind)) for c in chosen]
    if any(v is not None for v in (last, every, start, end)):
        raise MergeError("`last`, `every`, `start` and `end` select checkpoints of a run folder; give `run_dir`.")
    if not models:
        raise MergeError("Nothing to merge: give `models` (folders or Hub ids) or a `run_dir`.")
    if isinstance(models, (str, os.PathLike)):
        models = [models]
    if kind == "pma":
        raise MergeError(
            "`kind='pma'` selects the pma-N folders of a run folder; give `run_dir`, or list the "
            "pma-N folders themselves as `models` without it."
        )
    sources = [resolve_source(m, token=token, cache_dir=cache_dir) for m in models]
    for s in sources:
        s.state = _state(kind)
    seen: dict[Path, str] = {}
    for s in sources:
        key = s.path.resolve()
        if key in seen:
            warnings.warn(
                f"Input {s.name} is given twice (also as {seen[key]}); it counts twice, with both weights.",
                stacklevel=2,
            )
        seen[key] = s.name
    return sources
