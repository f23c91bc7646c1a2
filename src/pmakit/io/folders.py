"""Output folders that appear complete or not at all, and never inside their own inputs.

A folder is built in a temporary sibling and renamed into place only when complete, so a
crash, a full disk or an interrupt never leaves a half-written model where a user (or a Hub
upload) would pick it up.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError


__all__ = ["atomic_directory", "check_output_outside_inputs", "copy_model_folder", "publish_directory"]


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


@contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it replaces ``path``, on any error it is removed.

    An existing non-empty ``path`` is refused unless ``overwrite`` is set, and checked before any
    work starts so that a long merge does not fail at its very end.
    """
    target = Path(path).absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"Output path {target} exists and is not a folder.")
    if _is_nonempty_dir(target) and not overwrite:
        raise FileExistsError(
            f"Output folder {target} already exists and is not empty; pass overwrite=True to replace it."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # "_" first: the Trainer's Hub pushes skip `_*`, so a push that runs while a folder is being
    # built never uploads it half-written.
    tmp = Path(tempfile.mkdtemp(prefix=f"_{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        publish_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_directory(tmp: Path, target: Path) -> None:
    """Move the finished folder ``tmp`` to ``target``, replacing an old ``target`` only after the move."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f"_{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def copy_model_folder(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Replace ``path`` by a copy of the finished folder ``source`` (built aside, then renamed)."""
    with atomic_directory(path, overwrite=True) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    return Path(path)


def check_output_outside_inputs(
    output: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike]], *, overwrite: bool = False
) -> None:
    """Refuse an output folder that lies inside an input, or (with ``overwrite``) one that holds an input.

    ``inputs`` are ``(label, folder)`` pairs; the label names the input in the message.

    Raises:
        InputError: the output and an input overlap.
    """
    out = Path(output).resolve()
    for label, folder in inputs:
        src = Path(folder).resolve()
        if out == src or out.is_relative_to(src):
            raise InputError(f"Output folder {output} is inside input {label}; choose a folder outside every input.")
        if overwrite and src.is_relative_to(out):
            raise InputError(f"Input {label} is inside output folder {output}, which overwrite would delete.")
