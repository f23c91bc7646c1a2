"""Writing a merged model folder, shared by online PMA and the offline merger.

A folder is built in a temporary sibling and renamed into place only when complete, so a
crash, a full disk or an interrupt never leaves a half-written model where a user (or the
Hub upload) would pick it up. The model card is part of the folder, written before any push.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import yaml


__all__ = ["atomic_directory", "build_model_card", "copy_model_folder", "publish_directory", "save_averaged_model"]


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
        raise FileExistsError(f"Output folder {target} already exists and is not empty; pass overwrite=True to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        publish_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_directory(tmp: Path, target: Path) -> None:
    """Move the finished folder ``tmp`` to ``target``, replacing an old ``target`` only after the move."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def build_model_card(
    *,
    title: str,
    summary: str,
    base_models: Sequence[str] = (),
    library_name: str = "transformers",
    tags: Sequence[str] = ("merge", "pma"),
    recipe: dict | None = None,
    details: Sequence[tuple[str, str]] = (),
) -> str:
    """A README.md with Hub metadata: ``base_model`` (Hub ids only), ``library_name``, ``tags``.

    ``recipe`` is rendered as YAML so the merge can be reproduced exactly; ``details`` are extra
    ``(heading, markdown)`` sections.
    """
    meta: dict = {}
    hub_ids = [m for m in base_models if _looks_like_hub_id(m)]
    if hub_ids:
        meta["base_model"] = hub_ids
        meta["base_model_relation"] = "merge"
    meta["library_name"] = library_name
    meta["tags"] = list(dict.fromkeys(tags))
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {title}", "", summary.strip(), ""]
    for heading, body in details:
        lines += [f"## {heading}", "", body.strip(), ""]
    if recipe is not None:
        lines += [
            "## Recipe",
            "",
            "```yaml",
            yaml.safe_dump(recipe, sort_keys=False).rstrip(),
            "```",
            "",
        ]
    lines += ["Made with [pmakit](https://github.com/pmakit/pmakit).", ""]
    return "\n".join(lines)


def _looks_like_hub_id(name: str) -> bool:
    """`org/name` or `name` that is not a local path (cards name only Hub models as `base_model`)."""
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")) or os.sep in name.replace("/", "", 1):
        return False
    return name.count("/") <= 1 and " " not in name


def save_averaged_model(
    model,
    averages: dict,
    path: str | os.PathLike,
    *,
    processing_class=None,
    model_card: str | None = None,
) -> Path:
    """Write ``model`` with ``averages`` (``{param: fp32 tensor}``) in place of its live weights.

    The live model is not touched: the averaged tensors are cast to each parameter's dtype and
    passed to ``save_pretrained`` as its state dict, so parameters that were not averaged
    (frozen ones, buffers) come from the model. Every name of a tied parameter maps to the same
    tensor, so ``save_pretrained`` still writes it once. PEFT models write their adapter only.
    The folder is built aside and renamed into place, replacing an older one.
    """
    state_dict = model.state_dict()
    names_by_param: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(param), []).append(name)
    for param, avg in averages.items():
        names = names_by_param.get(id(param))
        if not names:
            continue
        merged = avg.detach().to(device=param.device, dtype=param.dtype)
        for name in names:
            if name in state_dict:
                state_dict[name] = merged
    with atomic_directory(path, overwrite=True) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        if processing_class is not None and hasattr(processing_class, "save_pretrained"):
            processing_class.save_pretrained(tmp)
        if model_card is not None:
            (tmp / "README.md").write_text(model_card, encoding="utf-8")
    return Path(path)


def copy_model_folder(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Replace ``path`` by a copy of the finished folder ``source`` (built aside, then renamed)."""
    with atomic_directory(path, overwrite=True) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    return Path(path)
