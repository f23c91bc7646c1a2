"""Finding a model folder's weight files: the one place that knows HF's layouts.

A folder holds ``model.safetensors``, or shards named by ``model.safetensors.index.json``
(``adapter_model.*`` for PEFT adapters), or, in older checkpoints, pickled ``.bin`` files. The
index, when there is one, is the truth: stray ``*.safetensors`` beside it are not weights.
"""

from __future__ import annotations

import json
from pathlib import Path, PureWindowsPath

from ..errors import InputError, brief


__all__ = ["PICKLE_PATTERNS", "WEIGHT_INDEXES", "find_pickle_files", "find_weight_files", "read_weight_map"]

WEIGHT_INDEXES = ("model.safetensors.index.json", "adapter_model.safetensors.index.json")
PICKLE_PATTERNS = ("pytorch_model*.bin", "adapter_model.bin")


def read_weight_map(index: Path) -> dict[str, str]:
    """``{tensor name: shard file name}`` of a safetensors index, validated.

    Every shard must be a plain file name in the index's own folder: an entry such as
    ``../elsewhere.safetensors`` or an absolute path would make a merge read a file outside its
    input, so it is refused. (Shards that are symlinks, as in the Hub cache's ``snapshots/``, are fine.)

    Raises:
        InputError: the index is not JSON, has no ``weight_map`` object, or names a shard outside its folder.
    """
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise InputError(f"{index} is not a valid safetensors index (needs a `weight_map`).") from e
    if not isinstance(weight_map, dict):
        raise InputError(
            f"{index}: `weight_map` must be an object of tensor name -> shard file, not {type(weight_map).__name__}."
        )
    for tensor, shard in weight_map.items():
        if not _is_plain_file_name(shard):
            raise InputError(
                f"{index}: tensor {brief(tensor)} maps to {brief(shard)}; shards must be plain file names "
                f"inside {index.parent}."
            )
    return weight_map


def _is_plain_file_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and not PureWindowsPath(name).drive
    )


def _indexed_files(folder: Path, index: Path) -> list[Path]:
    files = [folder / name for name in sorted(set(read_weight_map(index).values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise InputError(f"{index} names shard(s) {', '.join(missing)} that are not in {folder}.")
    return files


def find_pickle_files(folder: str | Path) -> list[Path]:
    """The pickled ``.bin`` weight files of ``folder`` (loading them is the caller's decision)."""
    folder = Path(folder)
    return sorted(p for pattern in PICKLE_PATTERNS for p in folder.glob(pattern))


def find_weight_files(folder: str | Path) -> list[Path]:
    """The safetensors weight files of ``folder``: from its index when there is one, else every ``*.safetensors``.

    Raises:
        InputError: the folder is missing, its index is broken, or it holds no safetensors weights
            (the message says when it holds pickled ``.bin`` files instead).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(
            f"Model folder {folder} does not exist." if not folder.exists() else f"{folder} is not a folder."
        )
    for name in WEIGHT_INDEXES:
        if (folder / name).is_file():
            return _indexed_files(folder, folder / name)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = find_pickle_files(folder)
    if pickles:
        raise InputError(
            f"{folder} holds only pickled checkpoints ({', '.join(p.name for p in pickles)}), not safetensors weights."
        )
    raise InputError(f"No weights (*.safetensors) found in {folder}.")
