"""``pmakit.merge(...)``: resolve inputs, plan, fold into a temporary folder, publish, push.

The output folder is complete when it appears: shards, ``model.safetensors.index.json`` (when
sharded), ``config.json``/``generation_config.json``/tokenizer files from the base model (else the
newest input), the model card ``README.md`` and the recipe ``pmakit_recipe.yaml``. It is built in a
temporary sibling and renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..averaging import AveragingRule
from ..errors import InputError, MergeError
from ..io.cards import build_model_card
from ..io.folders import atomic_directory, check_output_outside_inputs
from ..io.hub_target import HubTarget
from ..io.safetensors import CONFIG_DTYPE_NAMES, ShardWriter
from ..io.side_files import copy_side_files
from .plan import MergePlan, build_plan
from .scopes import folder_scopes, warn_on_scope_differences
from .sources import resolve_inputs, resolve_source
from .stream import DEFAULT_BLOCK_ELEMENTS, run_fold


__all__ = ["RECIPE_FILE", "MergeResult", "merge", "plan_merge"]

RECIPE_FILE = "pmakit_recipe.yaml"


@dataclass
class MergeResult:
    """What a merge did: the plan, the published folder (``None`` on a dry run), the Hub commit URL."""

    plan: MergePlan
    output: Path | None = None
    commit_url: str | None = None
    seconds: float = 0.0
    recipe: dict | None = None


def _as_merge_errors(func):
    """Report bad input found by the IO layer as `MergeError`, the one error type of the merger."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except MergeError:
            raise
        except InputError as e:
            raise MergeError(str(e)) from e

    return wrapper


def _rule(algo: str, alpha: float, weights: Sequence[float] | None, normalize: bool) -> AveragingRule:
    if weights is not None and algo in ("sma", "weights"):
        algo = "weights"
    try:
        return AveragingRule(algo, float(alpha), tuple(weights) if weights is not None else None, normalize)
    except ValueError as e:
        raise MergeError(str(e)) from e


@_as_merge_errors
def plan_merge(
    models: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
    *,
    run_dir: str | os.PathLike | None = None,
    last: int | None = None,
    every: int | None = None,
    start: int | None = None,
    end: int | None = None,
    kind: str = "checkpoint",
    algo: str = "sma",
    alpha: float = 0.2,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
    base_model: str | os.PathLike | None = None,
    backbone_only: bool = False,
    backbone_patterns: Sequence[str] | None = None,
    accumulate_dtype: str = "float32",
    out_dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    allow_pickle: bool = False,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    scratch: Path | None = None,
) -> MergePlan:
    """Resolve and validate the inputs and plan the merge, reading headers only."""
    rule = _rule(algo, alpha, weights, normalize)
    if isinstance(models, (str, os.PathLike)):
        models = [models]
    sources = resolve_inputs(
        models,
        run_dir=run_dir,
        last=last,
        every=every,
        start=start,
        end=end,
        kind=kind,
        token=token,
        cache_dir=cache_dir,
    )
    base = resolve_source(base_model, token=token, cache_dir=cache_dir) if base_model is not None else None
    for s in [*sources, *([base] if base else [])]:
        s.load(allow_pickle=allow_pickle, scratch=scratch)
    return build_plan(
        sources,
        rule,
        base=base,
        backbone_only=backbone_only,
        backbone_patterns=backbone_patterns,
        accumulate_dtype=accumulate_dtype,
        out_dtype=out_dtype,
        max_shard_size=max_shard_size,
    )


def _check_output(output: Path, plan: MergePlan, overwrite: bool) -> None:
    inputs = [(s.label, s.path) for s in [*plan.sources, *([plan.base] if plan.base else [])]]
    try:
        check_output_outside_inputs(output, inputs, overwrite=overwrite)
    except InputError as e:
        raise MergeError(str(e)) from None


def _recipe(plan: MergePlan, options: dict) -> dict:
    """The exact, re-runnable recipe: the resolved inputs in order and every setting that shaped the result."""
    rule = plan.rule
    recipe: dict = {"models": [s.label for s in plan.sources]}
    if plan.sources[0].state == "pma":
        recipe["kind"] = "pma-state"  # the inputs' stored PMA averages, not their weights
    recipe["algo"] = rule.algo
    if rule.algo == "ema":
        recipe["alpha"] = rule.alpha
    if rule.algo == "weights":
        recipe["weights"] = list(rule.weights)
        recipe["normalize"] = rule.normalize
    if plan.base is not None:
        recipe["base_model"] = plan.base.label
    if plan.backbone_only:
        recipe["backbone_only"] = True
        recipe["backbone_patterns"] = list(plan.backbone_patterns)
    recipe["accumulate_dtype"] = plan.accumulate_dtype
    if plan.out_dtype is not None:
        recipe["out_dtype"] = CONFIG_DTYPE_NAMES.get(plan.out_dtype, plan.out_dtype)
    recipe["max_shard_size"] = plan.max_shard_size
    for key in ("save_tokenizer", "allow_nonfinite", "allow_pickle"):
        if options.get(key) is not None:
            recipe[key] = options[key]
    return recipe


def _card(plan: MergePlan, recipe: dict, title: str) -> str:
    rows = ["| # | input | step | weight |", "|---|---|---|---|"]
    for i, (s, w) in enumerate(zip(plan.sources, plan.weights, strict=True), 1):
        rows.append(f"| {i} | `{s.label}` | {s.step if s.step is not None else ''} | {w:.6g} |")
    details = [("Inputs", "Oldest first; the last input is the newest.\n\n" + "\n".join(rows))]
    if plan.backbone_only:
        kept = [t.out.name for t in plan.tensors if t.action == "base"]
        details.append(
            ("Backbone only", f"Taken unchanged from `{plan.base.label}`: " + ", ".join(f"`{n}`" for n in kept) + ".")
        )
    summary = (
        f"This model is the {plan.rule.describe(len(plan.sources))} of the weights below, made by streaming them "
        f"through a {plan.accumulate_dtype} accumulator with pmakit (Pre-trained Model Averaging, arXiv 2505.12082). "
        f"Its config and tokenizer come from `{plan.donor.label}`."
    )
    hub_ids = [s.hub_id for s in [*plan.sources, *([plan.base] if plan.base else [])] if s.hub_id]
    library = "peft" if plan.sources[0].is_adapter else "transformers"
    return build_model_card(
        title=title,
        summary=summary,
        base_models=list(dict.fromkeys(hub_ids)),
        library_name=library,
        tags=("merge", "pma"),
        recipe=recipe,
        details=details,
    )


def _copy_side_files(plan: MergePlan, folder: Path, save_tokenizer: bool) -> None:
    updates = None
    if plan.out_dtype is not None:
        dtype = CONFIG_DTYPE_NAMES.get(plan.out_dtype, "float32")
        updates = {"dtype": dtype, **({"torch_dtype": dtype} if "torch_dtype" in plan.donor.config else {})}
    copy_side_files(plan.donor.path, folder, tokenizer=save_tokenizer, config_updates=updates)


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="merging", leave=False)


@_as_merge_errors
def merge(
    models: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    *,
    run_dir: str | os.PathLike | None = None,
    last: int | None = None,
    every: int | None = None,
    start: int | None = None,
    end: int | None = None,
    kind: str = "checkpoint",
    algo: str = "sma",
    alpha: float = 0.2,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
    base_model: str | os.PathLike | None = None,
    backbone_only: bool = False,
    backbone_patterns: Sequence[str] | None = None,
    accumulate_dtype: str = "float32",
    out_dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    save_tokenizer: bool = True,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    allow_pickle: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    reader: str = "mmap",
    progress: bool = False,
    dry_run: bool = False,
    check_scopes: bool = False,
    scope_threshold: float = 0.1,
) -> MergeResult:
    """Merge model folders, a run's checkpoints or Hub models into one model folder (and push it).

    Inputs are ``models`` (folders or ``owner/name[@revision]`` Hub ids, in the order given, the
    last being the newest) or ``run_dir`` with a selection (``last``, ``every``, ``start``/``end``;
    ``kind="pma"`` selects ``pma-N`` folders; ``kind="pma-state"`` reads the PMA average stored in
    each ``checkpoint-N``'s sharded optimizer state instead of its weights). Checkpoint folders may
    hold safetensors, pickled ``.bin`` files or FSDP ``torch.distributed.checkpoint`` folders
    (pickles need ``allow_pickle``; they are read by an allow-list unpickler, zero-copy). The rule
    (``algo`` sma|ema|wma, ``alpha``, ``weights`` with ``normalize``) is
    :class:`pmakit.averaging.AveragingRule`, the same law as online PMA. ``backbone_only`` keeps
    embeddings, LM head and final norm of ``base_model``.
    Floats are accumulated in ``accumulate_dtype`` (float32, or float64) and written in the inputs'
    dtype unless ``out_dtype``. ``check_scopes`` first warns (``UserWarning``) about layers whose weight
    mean/std differ across the inputs beyond ``scope_threshold`` (reads every weight once more; see
    `pmakit.scope`). ``push_to_hub`` is a repo id; the token comes from ``token``, the
    environment or the saved login, and is never printed. Raises :class:`MergeError` on bad input.
    """
    started = time.perf_counter()
    if output is None and not dry_run:
        raise MergeError("Give an `output` folder for the merged model.")
    scratch = Path(tempfile.mkdtemp(prefix="pmakit-merge-"))
    try:
        plan = plan_merge(
            models,
            run_dir=run_dir,
            last=last,
            every=every,
            start=start,
            end=end,
            kind=kind,
            algo=algo,
            alpha=alpha,
            weights=weights,
            normalize=normalize,
            base_model=base_model,
            backbone_only=backbone_only,
            backbone_patterns=backbone_patterns,
            accumulate_dtype=accumulate_dtype,
            out_dtype=out_dtype,
            max_shard_size=max_shard_size,
            allow_pickle=allow_pickle,
            token=token,
            cache_dir=cache_dir,
            scratch=scratch,
        )
        options = {
            "save_tokenizer": save_tokenizer,
            "allow_nonfinite": allow_nonfinite or None,
            "allow_pickle": allow_pickle or None,
        }
        recipe = _recipe(plan, options)
        if check_scopes:
            warn_on_scope_differences([folder_scopes(s.path) for s in plan.sources], scope_threshold)
        if dry_run:
            return MergeResult(plan=plan, recipe=recipe, seconds=time.perf_counter() - started)
        output = Path(output)
        _check_output(output, plan, overwrite)
        with atomic_directory(output, overwrite=overwrite) as tmp:
            recipe_out = {**recipe, "output": str(output)}
            (tmp / "README.md").write_text(_card(plan, recipe_out, output.name), encoding="utf-8")
            (tmp / RECIPE_FILE).write_text(yaml.safe_dump(recipe_out, sort_keys=False), encoding="utf-8")
            _copy_side_files(plan, tmp, save_tokenizer)
            writer = ShardWriter(tmp, [t.out for t in plan.tensors], plan.shard_names)
            bar = _progress_bar(plan.bytes_to_write, progress)
            try:
                run_fold(
                    plan,
                    writer,
                    threads=threads,
                    allow_nonfinite=allow_nonfinite,
                    block_elements=block_elements,
                    reader=reader,
                    progress=bar.update if bar is not None else None,
                )
                writer.close()
            except BaseException:
                writer.abort()
                raise
            finally:
                if bar is not None:
                    bar.close()
            if len(plan.shard_names) > 1:
                index = plan.shard_names[0].split("-")[0] + ".safetensors.index.json"
                (tmp / index).write_text(json.dumps(writer.index(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        result = MergeResult(plan=plan, output=output, recipe=recipe_out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if push_to_hub:
        target = HubTarget(
            push_to_hub,
            private=private,
            revision=revision,
            token=token,
            commit_message=commit_message or f"Upload {plan.rule.describe(len(plan.sources))} merged with pmakit",
        )
        from ..io.hub import push_folder_to_hub  # imported here: local merges start without huggingface_hub

        result.commit_url = push_folder_to_hub(output, target)
    result.seconds = time.perf_counter() - started
    return result
