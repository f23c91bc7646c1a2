"""Averaging LoRA adapters (PEFT folders, including the ``pma/`` and ``pma-N/`` folders of PEFT runs).

A LoRA adapter changes a weight by ``delta = s * B @ A`` (``s = lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with rsLoRA). Averaging adapters can mean two different things:

* **factor averaging** (``method="factor"``): average the A factors and the B factors
  separately. Cheap, and the result is an adapter of the same rank, but
  ``(sum_i w_i B_i)(sum_j w_j A_j)`` is *not* ``sum_i w_i B_i A_i``: the cross terms
  ``w_i w_j B_i A_j`` remain. It is exact only when all adapters share A (or all share B), and
  close when the adapters are close to each other (successive samples of one run, the PMA case).
* **exact averaging**: the weighted average of the updates ``sum_i w_i s_i B_i A_i``, either
  as a higher-rank adapter by concatenation (``method="concat"``: ``B = [w_1 s_1 B_1 | ... ]``,
  ``A = [A_1; ...]``, rank ``sum_i r_i`` and scaling 1), or merged into the base model's weights
  (``method="merge"``: a complete model folder, no adapter left).

The weights follow `pmakit.averaging` (sma, ema, wma or explicit weights; inputs oldest first).
Non-LoRA tensors of the adapters (``modules_to_save``, trainable tokens) are linear in the
weights, so they are averaged directly. Accumulation is fp32 (fp64 on request); outputs keep the
adapters' dtype. Output folders are built aside and renamed into place when complete. Adapter
folders are read, and their exact updates computed, by `pmakit.soups.lora_adapter`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..averaging import AveragingRule
from ..errors import InputError, brief
from ..io.cards import build_model_card
from ..io.folders import atomic_directory, check_output_outside_inputs
from ..io.side_files import copy_side_files
from ..io.weight_files import WEIGHT_INDEXES, find_weight_files
from .lora_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter, base_name, load_lora_adapter, lora_deltas
from .weighted_sum import weighted_sum


__all__ = ["LORA_METHODS", "LoraAdapter", "average_lora_adapters", "load_lora_adapter", "lora_deltas"]

LORA_METHODS = ("factor", "concat", "merge")


def _average_extras(adapters: Sequence[LoraAdapter], weights: Sequence[float], acc) -> dict[str, torch.Tensor]:
    keys = adapters[-1].extras()
    out = {}
    for key in keys:
        tensors = []
        for adapter in adapters:
            if key not in adapter.tensors:
                raise InputError(f"Tensor {brief(key)} is in {adapters[-1].path} but missing from {adapter.path}.")
            tensors.append(adapter.tensors[key])
        out[key] = _weighted(tensors, weights, acc, key, [a.path for a in adapters])
    return out


def _weighted(tensors, weights, acc, key, paths) -> torch.Tensor:
    """The weighted average of one tensor across adapters; integer tensors must agree and are copied."""
    if not tensors[0].is_floating_point():
        if any(t.shape != tensors[0].shape or not torch.equal(t, tensors[0]) for t in tensors):
            raise InputError(f"Integer tensor {brief(key)} differs between adapters; it cannot be averaged.")
        return tensors[0].clone()
    return weighted_sum(tensors, weights, name=key, sources=paths, accumulate_dtype=acc)


def _check_same_modules(adapters: Sequence[LoraAdapter]) -> list[str]:
    reference = adapters[-1].modules()
    for adapter in adapters:
        modules = adapter.modules()
        if set(modules) != set(reference):
            diff = sorted(set(modules) ^ set(reference))[:3]
            raise InputError(
                f"{adapter.path} and {adapters[-1].path} adapt different modules (e.g. {brief(diff)}); "
                "factor averaging needs the same modules in every adapter (exact averaging does not)."
            )
    return list(reference)


def _factor_average(adapters, weights, acc) -> tuple[dict, dict]:
    modules = _check_same_modules(adapters)
    newest = adapters[-1]
    out = {}
    for module in modules:
        s_ref = newest.scaling(module)
        for adapter in adapters:
            keys = adapter.modules()[module]
            if (
                adapter.tensors[keys["A"]].shape != newest.tensors[newest.modules()[module]["A"]].shape
                or adapter.tensors[keys["B"]].shape != newest.tensors[newest.modules()[module]["B"]].shape
            ):
                raise InputError(
                    f"Module {brief(module)}: rank or shape differs between {adapter.path} and {newest.path}; factor "
                    "averaging needs adapters of the same rank (use method='concat' or 'merge')."
                )
            if not math.isclose(adapter.scaling(module), s_ref, rel_tol=1e-12):
                raise InputError(
                    f"Module {brief(module)}: LoRA scaling (lora_alpha / r) is {adapter.scaling(module):g} in "
                    f"{adapter.path} but {s_ref:g} in {newest.path}; factor averaging needs equal scalings "
                    "(use method='concat' or 'merge')."
                )
        for kind in ("A", "B"):
            key = newest.modules()[module][kind]
            out[key] = _weighted(
                [a.tensors[a.modules()[module][kind]] for a in adapters], weights, acc, key, [a.path for a in adapters]
            )
    return out, dict(newest.config)


def _concat_average(adapters, weights, acc) -> tuple[dict, dict]:
    pieces: dict[str, dict] = {}
    for adapter, w in zip(adapters, weights, strict=True):
        for module, keys in adapter.modules().items():
            entry = pieces.setdefault(module, {"A": [], "B": [], "keys": keys})
            a, b = adapter.tensors[keys["A"]], adapter.tensors[keys["B"]]
            entry["A"].append(a)
            entry["B"].append(weighted_sum([b], [w * adapter.scaling(module)], name=keys["B"], accumulate_dtype=acc))
    out, ranks = {}, {}
    for module, entry in pieces.items():
        keys = entry["keys"]
        try:
            out[keys["A"]] = torch.cat(entry["A"], dim=0)
            out[keys["B"]] = torch.cat(entry["B"], dim=1)
        except RuntimeError as err:
            raise InputError(
                f"Module {brief(module)}: the adapters' factors have incompatible shapes ({err})."
            ) from None
        ranks[base_name(module)] = out[keys["A"]].shape[0]
    config = dict(adapters[-1].config)
    rank = max(ranks.values())
    # Scaling 1 everywhere: lora_alpha == r per module, without rsLoRA; the s_i are folded into B.
    config.update(r=rank, lora_alpha=rank, use_rslora=False)
    odd = {m: r for m, r in ranks.items() if r != rank}
    config["rank_pattern"] = {rf"{re.escape(m)}": r for m, r in odd.items()}
    config["alpha_pattern"] = {rf"{re.escape(m)}": r for m, r in odd.items()}
    targets = sorted({m.rsplit(".", 1)[-1] for m in ranks})
    if isinstance(config.get("target_modules"), list) or config.get("target_modules") is None:
        config["target_modules"] = sorted(set(config.get("target_modules") or []) | set(targets))
    return out, config


def _merge_targets(adapters, weights, acc) -> dict[str, torch.Tensor | tuple[str, torch.Tensor]]:
    """Base weight name -> the averaged update to add, or ``("replace", tensor)`` for modules_to_save."""
    targets: dict[str, torch.Tensor | tuple[str, torch.Tensor]] = {}
    for module, delta in lora_deltas(adapters, weights, dtype=acc).items():
        targets[f"{base_name(module)}.weight"] = delta
    for key, value in _average_extras(adapters, weights, acc).items():
        name = base_name(key).replace(".modules_to_save.", ".").replace(".original_module.", ".")
        targets[name] = ("replace", value)
    return targets


def _merge_shard(shard: Path, targets: dict, acc, out: Path) -> set[str]:
    """Write ``shard`` with the updates applied to ``out``; returns the names it updated."""
    with safe_open(shard, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    seen = set(tensors) & set(targets)
    for key in seen:
        tensor, change = tensors[key], targets[key]
        if isinstance(change, tuple):
            tensors[key] = change[1].to(tensor.dtype)
            continue
        if change.shape != tensor.shape:
            raise InputError(
                f"LoRA update for {brief(key)} has shape {tuple(change.shape)}, but the base weight in "
                f"{shard} has {tuple(tensor.shape)}: the adapters were not trained on this base."
            )
        sources = [shard, "the averaged LoRA update"]
        tensors[key] = weighted_sum(
            [tensor, change], [1.0, 1.0], name=key, sources=sources, accumulate_dtype=acc, out_dtype=tensor.dtype
        )
    save_file(tensors, out / shard.name, metadata=metadata or {"format": "pt"})
    return seen


def _merge_into_base(adapters, weights, base: Path, tmp: Path, acc) -> None:
    """Base + averaged update, shard by shard (only the shards the base's index names), into ``tmp``."""
    targets = _merge_targets(adapters, weights, acc)
    seen: set[str] = set()
    for shard in find_weight_files(base):
        seen |= _merge_shard(shard, targets, acc, tmp)
    missing = sorted(set(targets) - seen)
    if missing:
        raise InputError(
            f"Base model {base} has no weight {brief(missing[0])} that the adapters update "
            f"({len(missing)} missing): wrong base model?"
        )
    copy_side_files(base, tmp)
    for name in WEIGHT_INDEXES:  # the shards keep their names, so the base's index still maps them
        if (base / name).is_file():
            shutil.copy2(base / name, tmp / name)


def _check_method(method: str, adapters: Sequence, base_model) -> None:
    if method not in LORA_METHODS:
        raise InputError(f"`method` must be one of {', '.join(LORA_METHODS)}; got {brief(method)}.")
    if not adapters:
        raise InputError("Give at least one adapter folder to average.")
    if method == "merge" and base_model is None:
        raise InputError(
            "method='merge' adds the averaged update to a base model: pass `base_model` (a model folder)."
        )
    if base_model is not None and method != "merge":
        raise InputError("`base_model` is only used by method='merge'.")


def _write_adapter(loaded: Sequence[LoraAdapter], weights, method: str, acc, tmp: Path) -> None:
    """An adapter folder (factor or concat average) plus the tokenizer files of the newest adapter."""
    tensors, config = (_factor_average if method == "factor" else _concat_average)(loaded, weights, acc)
    tensors.update(_average_extras(loaded, weights, acc))
    save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for item in loaded[-1].path.iterdir():  # tokenizer files a PEFT run saved beside its adapter
        if (
            item.is_file()
            and item.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md")
            and not item.name.startswith(".")
            and not item.name.endswith((".bin", ".safetensors"))
        ):
            shutil.copy2(item, tmp / item.name)


def average_lora_adapters(
    adapters: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    method: str = "concat",
    algo: str = "sma",
    alpha: float = 0.2,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
    base_model: str | os.PathLike | None = None,
    accumulate_dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Average PEFT LoRA adapter folders (oldest first) into ``output_dir``.

    ``method``: ``"factor"`` (A and B averaged separately; same-rank adapter; not the average of
    the updates), ``"concat"`` (exact; adapter of rank ``sum r_i``), or ``"merge"`` (exact; the
    base model folder ``base_model`` with the averaged update added, a complete model). The first
    two write adapter folders loadable with ``PeftModel.from_pretrained``.

    Args:
        adapters: PEFT LoRA adapter folders, oldest first.
        output_dir: The output folder, written atomically.
        method: ``"factor"``, ``"concat"`` or ``"merge"``.
        algo: Averaging rule (``sma``, ``ema``, ``wma``, ``weights``).
        alpha: EMA weight of the newest adapter.
        weights: Explicit weights, one per adapter.
        normalize: Divide explicit weights by their sum.
        base_model: The base model folder, needed by ``method="merge"``.
        accumulate_dtype: Accumulation dtype (`torch.float32` or `torch.float64`).
        overwrite: Replace an existing output folder.

    Returns:
        The output folder.

    Raises:
        FileNotFoundError: an adapter or the base model is missing.
        ValueError: an unknown method, no adapters, adapters that are not LoRA or whose modules or
            shapes differ, unreadable weights, bad weights, or ``base_model`` given for another method
            or missing for ``"merge"``.
    """
    _check_method(method, adapters, base_model)
    loaded = [load_lora_adapter(p) for p in adapters]
    rule = AveragingRule(algo, alpha, tuple(weights) if weights is not None else None, normalize)
    w = rule.weights_for(len(loaded))
    output = Path(output_dir)
    check_output_outside_inputs(output, [(str(a.path), a.path) for a in loaded])
    with atomic_directory(output, overwrite=overwrite) as tmp:
        if method == "merge":
            _merge_into_base(loaded, w, Path(base_model), tmp, accumulate_dtype)
        else:
            _write_adapter(loaded, w, method, accumulate_dtype, tmp)
        library = "transformers" if method == "merge" else "peft"
        base_name = loaded[-1].config.get("base_model_name_or_path") or ""
        (tmp / "README.md").write_text(_card(method, rule, w, loaded, base_name, library), encoding="utf-8")
    return output


def _card(method, rule, weights, adapters, base_name, library) -> str:
    what = {
        "factor": "LoRA factor averaging: the A and B factors were averaged separately (an adapter of the same rank; "
        "not exactly the average of the updates B·A).",
        "concat": "exact LoRA averaging: the weighted average of the updates B·A, as one adapter whose rank is the "
        "sum of the inputs' ranks (factors concatenated, scalings folded into B).",
        "merge": "exact LoRA averaging merged into the base weights: base + weighted average of the updates B·A.",
    }[method]
    recipe = {
        "method": f"lora-{method}",
        "rule": rule.algo,
        "adapters": [str(a.path) for a in adapters],
        "weights": [round(x, 8) for x in weights],
    }
    recipe.update(rule.settings(card=True))  # e.g. alpha (the weights are listed above)
    return build_model_card(
        title=f"Averaged LoRA adapters ({method})",
        summary=f"The {rule.describe(len(adapters))} of {len(adapters)} LoRA adapters, by {what}",
        base_models=[base_name] if base_name else [],
        library_name=library,
        tags=("merge", "pma", "lora"),
        recipe=recipe,
    )
