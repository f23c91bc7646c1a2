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
from typing import TYPE_CHECKING

import yaml


if TYPE_CHECKING:
    import torch


__all__ = [
    "atomic_directory",
    "build_model_card",
    "copy_model_folder",
    "gather_averaged_state_dict",
    "publish_directory",
    "save_averaged_model",
]

# Files a model folder carries beside its weights, copied from a donor folder into merged outputs.
CONFIG_FILES = ("config.json", "generation_config.json", "adapter_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)


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


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def _full(t, is_main_process: bool):
    """``t`` whole on the CPU of the main process (None elsewhere); a DTensor is all-gathered (collective)."""
    if _is_dtensor(t):
        local = t.to_local()
        if local.device.type != t.device_mesh.device_type:  # an offloaded (pinned CPU) shard of a GPU mesh
            from torch.distributed.tensor import DTensor

            local = local.to(t.device_mesh.device_type)
            t = DTensor.from_local(local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())
        t = t.full_tensor()
    return t.detach().cpu() if is_main_process else None


def gather_averaged_state_dict(
    model,
    averages: dict,
    *,
    is_main_process: bool = True,
    optimizer_state_key: str | None = None,
) -> dict | None:
    """The model's full state dict with the averages in place of its weights, on the main process.

    Returns ``{name: CPU tensor}`` on the main process and None elsewhere. Sharded tensors are
    gathered one at a time, so no rank ever holds more than one full tensor beyond its shards:
    FSDP2 DTensors with ``full_tensor`` and, with ``optimizer_state_key`` (DeepSpeed ZeRO, where the
    average lives beside the fp32 master partitions), DeepSpeed's
    ``safe_get_full_optimizer_state``; frozen ZeRO-3 parameters are gathered with
    ``GatheredParameters``. Those are collectives: every process must call this, in the same order.
    Unsharded models need no communication and other processes return at once.
    """
    params = list(model.named_parameters(remove_duplicate=False))
    state_dict = model.state_dict()
    sharded = optimizer_state_key is not None or any(_is_dtensor(t) for t in state_dict.values())
    if not sharded and not is_main_process:
        return None
    names_by_param: dict[int, list[str]] = {}
    unique: list = []
    for name, param in params:
        if id(param) not in names_by_param:
            unique.append(param)
        names_by_param.setdefault(id(param), []).append(name)
    by_id = {id(p): a for p, a in averages.items()}
    result: dict = {}
    covered: set[str] = set()
    for param in unique:
        names = names_by_param[id(param)]
        covered.update(names)
        if not any(name in state_dict for name in names):
            continue
        if optimizer_state_key is not None:
            full = _gather_zero(param, optimizer_state_key, is_main_process)
        else:
            value = by_id.get(id(param), param)
            full = _full(value, is_main_process)
        if full is not None:
            full = full.to(dtype=param.dtype).reshape(_full_shape(param))
            for name in names:
                if name in state_dict:
                    result[name] = full
    for name, tensor in state_dict.items():  # buffers and anything else the model saves
        if name not in covered:
            value = _full(tensor, is_main_process)
            if value is not None:
                result[name] = value
    return result if is_main_process else None


def _full_shape(param) -> torch.Size:
    shape = getattr(param, "ds_shape", None)  # a ZeRO-3 parameter is empty outside a gather
    import torch  # not at the top: the offline merger imports this module without paying for torch

    return torch.Size(shape) if shape is not None else param.shape


def _gather_zero(param, key: str, is_main_process: bool):
    """One parameter's average (trainable) or weight (frozen) gathered from DeepSpeed ZeRO partitions."""
    from deepspeed.utils import safe_get_full_optimizer_state

    if param.requires_grad:
        full = safe_get_full_optimizer_state(param, key)
        if full is None:
            raise RuntimeError(f"DeepSpeed has no `{key}` state for a parameter of shape {tuple(_full_shape(param))}.")
        return full.detach().cpu() if is_main_process else None
    if hasattr(param, "ds_id"):
        from deepspeed.zero import GatheredParameters

        with GatheredParameters([param], modifier_rank=None):
            return param.detach().cpu().clone() if is_main_process else None
    return param.detach().cpu() if is_main_process else None


def save_averaged_model(
    model,
    averages: dict,
    path: str | os.PathLike,
    *,
    processing_class=None,
    model_card: str | None = None,
    is_main_process: bool = True,
    optimizer_state_key: str | None = None,
) -> Path | None:
    """Write ``model`` with ``averages`` (``{param: fp32 tensor}``) in place of its live weights.

    The live model is not touched: the averaged tensors are cast to each parameter's dtype and
    passed to ``save_pretrained`` as its state dict, so parameters that were not averaged
    (frozen ones, buffers) come from the model. Every name of a tied parameter maps to the same
    tensor, so ``save_pretrained`` still writes it once. PEFT models write their adapter only.
    The folder is built aside and renamed into place, replacing an older one.

    In a distributed run call it on every process: sharded weights (FSDP2, DeepSpeed ZeRO) are
    gathered with collectives (see `gather_averaged_state_dict`), and only the main process
    writes; the others return None.
    """
    if is_main_process and optimizer_state_key is None and not any(_is_dtensor(a) for a in averages.values()):
        state_dict = _local_state_dict(model, averages)
    else:
        state_dict = gather_averaged_state_dict(
            model, averages, is_main_process=is_main_process, optimizer_state_key=optimizer_state_key
        )
    if not is_main_process:
        return None
    with atomic_directory(path, overwrite=True) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        if processing_class is not None and hasattr(processing_class, "save_pretrained"):
            processing_class.save_pretrained(tmp)
        if model_card is not None:
            (tmp / "README.md").write_text(model_card, encoding="utf-8")
    return Path(path)


def _local_state_dict(model, averages: dict) -> dict:
    """An unsharded model's state dict with the averages cast in (no copy of anything else)."""
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
    return state_dict


def copy_model_folder(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Replace ``path`` by a copy of the finished folder ``source`` (built aside, then renamed)."""
    with atomic_directory(path, overwrite=True) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    return Path(path)
