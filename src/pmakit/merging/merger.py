"""``pmakit.merge(...)``: resolve inputs, plan, fold into a temporary folder, publish, push.

The output folder is complete when it appears: shards, ``model.safetensors.index.json`` (when
sharded), ``config.json``/``generation_config.json``/tokenizer files from the base model (else the
newest input), the model card ``README.md`` and the recipe ``pmakit_recipe.yaml``. It is built in a
temporary sibling and renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
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

from ..errors import InputError, MergeError
from ..io.cards import build_model_card
from ..io.folders import atomic_directory, check_output_outside_inputs, output_lock
from ..io.hub_target import HubTarget
from ..io.safetensors import CONFIG_DTYPE_NAMES, ShardWriter
from ..io.side_files import copy_side_files
from .options import MergeOptions, option_fields
from .plan import MergePlan, build_plan
from .scopes import folder_scopes, warn_on_scope_differences
from .sources import ModelSource, resolve_inputs, resolve_source
from .stream import run_fold


__all__ = ["RECIPE_FILE", "MergeResult", "merge", "plan_merge", "resolve_options"]

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


def resolve_options(options: MergeOptions | None, settings: dict) -> MergeOptions:
    """``options`` with ``settings`` (keyword arguments named like its fields) applied on top.

    Raises:
        MergeError: a keyword is not a `MergeOptions` field, or a value is invalid.
    """
    names = {f.name for f in option_fields()}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise MergeError(
            f"Unknown merge setting(s) {', '.join(unknown)}; the settings are the fields of MergeOptions: "
            f"{', '.join(sorted(names))}."
        )
    if options is not None and not isinstance(options, MergeOptions):
        raise MergeError(f"`options` must be a MergeOptions, got {type(options).__name__}.")
    if options is None:
        return MergeOptions(**settings)
    return dataclasses.replace(options, **settings) if settings else options


def _as_list(models: Sequence[str | os.PathLike] | str | os.PathLike | None) -> list | None:
    return [models] if isinstance(models, (str, os.PathLike)) else models


def _load_sources(
    models: Sequence[str | os.PathLike] | str | os.PathLike | None,
    run_dir: str | os.PathLike | None,
    options: MergeOptions,
    scratch: Path | None,
) -> tuple[list[ModelSource], ModelSource | None]:
    """Resolve the inputs (and the base) and read their headers."""
    sources = resolve_inputs(
        _as_list(models),
        run_dir=run_dir,
        last=options.last,
        every=options.every,
        start=options.start,
        end=options.end,
        kind=options.kind,
        token=options.token,
        cache_dir=options.cache_dir,
    )
    base = None
    if options.base_model is not None:
        base = resolve_source(options.base_model, token=options.token, cache_dir=options.cache_dir)
    for s in [*sources, *([base] if base else [])]:
        s.load(allow_pickle=options.allow_pickle, scratch=scratch)
    return sources, base


def _build_plan(sources: list[ModelSource], base: ModelSource | None, options: MergeOptions) -> MergePlan:
    """`build_plan` with the options' settings; ``config_source`` chooses the donor of config and tokenizer."""
    return build_plan(
        sources,
        options.rule(),
        donor=options.config_source,
        base=base,
        backbone_only=options.backbone_only,
        backbone_patterns=options.backbone_patterns,
        accumulate_dtype=options.accumulate_dtype,
        out_dtype=options.out_dtype,
        max_shard_size=options.max_shard_size,
    )


@_as_merge_errors
def plan_merge(
    models: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
    *,
    run_dir: str | os.PathLike | None = None,
    options: MergeOptions | None = None,
    scratch: Path | None = None,
    **settings,
) -> MergePlan:
    """Resolve and validate the inputs and plan the merge, reading headers only.

    Args:
        models: model folders or ``owner/name[@revision]`` Hub ids, oldest first (or one run folder).
        run_dir: a run folder whose ``checkpoint-N``/``pma-N`` subfolders are selected by the options.
        options: the merge settings; ``settings`` (keywords named like its fields) override them.
        scratch: a folder for converted pickle checkpoints (``merge`` passes a temporary one).

    Returns:
        The plan: inputs with their weights, every output tensor and the shards.

    Raises:
        MergeError: bad settings or inputs, named.
    """
    options = resolve_options(options, settings)
    sources, base = _load_sources(models, run_dir, options, scratch)
    return _build_plan(sources, base, options)


def _check_output(output: Path, plan: MergePlan, overwrite: bool) -> None:
    inputs = [(s.label, s.path) for s in [*plan.sources, *([plan.base] if plan.base else [])]]
    try:
        check_output_outside_inputs(output, inputs, overwrite=overwrite)
    except InputError as e:
        raise MergeError(str(e)) from None


# Written from the plan (inputs resolved, rule made explicit) rather than copied from the options.
_RESOLVED_KEYS = frozenset({"last", "every", "start", "end", "kind", "algo", "alpha", "weights", "normalize"})
# Where this run put the result, not what the result is: a re-run of the recipe must not push or overwrite.
_PLACEMENT_KEYS = frozenset({"overwrite", "cache_dir", "push_to_hub", "private", "revision", "commit_message"})


def _recipe(plan: MergePlan, options: MergeOptions) -> dict:
    """The exact, re-runnable recipe: the resolved inputs in order and every setting that shaped the result."""
    rule = plan.rule
    recipe: dict = {"models": [s.label for s in plan.sources]}
    if plan.sources[0].state == "pma":
        recipe["kind"] = "pma-state"  # the inputs' stored PMA averages, not their weights
    recipe["algo"] = rule.algo
    recipe.update(rule.settings())  # every parameter the rule reads, so the recipe re-runs exactly
    settings = options.recipe_settings()
    recipe.update({k: v for k, v in settings.items() if k not in _RESOLVED_KEYS | _PLACEMENT_KEYS})
    if plan.base is not None:
        recipe["base_model"] = plan.base.label
    if plan.backbone_only:
        recipe["backbone_patterns"] = list(plan.backbone_patterns)
    recipe["accumulate_dtype"] = plan.accumulate_dtype
    if plan.out_dtype is not None:
        recipe["out_dtype"] = CONFIG_DTYPE_NAMES.get(plan.out_dtype, plan.out_dtype)
    recipe["max_shard_size"] = plan.max_shard_size
    recipe["save_tokenizer"] = options.save_tokenizer
    return recipe


def _card(plan: MergePlan, recipe: dict, title: str, label=lambda s: s.label) -> str:
    """The model card; ``label`` names an input (relative paths for local folders: see `_portable_label`)."""
    rows = ["| # | input | step | weight |", "|---|---|---|---|"]
    for i, (s, w) in enumerate(zip(plan.sources, plan.weights, strict=True), 1):
        rows.append(f"| {i} | `{label(s)}` | {s.step if s.step is not None else ''} | {w:.6g} |")
    details = [("Inputs", "Oldest first; the last input is the newest.\n\n" + "\n".join(rows)), *plan.card_details()]
    summary = (
        f"This model is the {plan.rule.describe(len(plan.sources))} of the weights below, made by streaming them "
        f"through a {plan.accumulate_dtype} accumulator with pmakit (Pre-trained Model Averaging, arXiv 2505.12082). "
        f"Its config and tokenizer come from `{label(plan.donor)}`."
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
    updates = {}
    if plan.out_dtype is not None:
        dtype = CONFIG_DTYPE_NAMES.get(plan.out_dtype, "float32")
        updates = {"dtype": dtype, **({"torch_dtype": dtype} if "torch_dtype" in plan.donor.config else {})}
    if plan.tie_word_embeddings is not None:  # the inputs' LM heads decided it, not the donor's config
        updates["tie_word_embeddings"] = plan.tie_word_embeddings
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
    options: MergeOptions | None = None,
    **settings,
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
    Floats are accumulated in ``accumulate_dtype`` and written in the inputs' dtype unless
    ``out_dtype``. ``push_to_hub`` is a repo id or a `HubTarget`; the token comes from the target,
    ``token``, the environment or the saved login, and is never printed. Every setting is a field of
    :class:`MergeOptions`.

    Args:
        models: model folders or Hub ids, oldest first (or one run folder).
        output: the folder to create; it appears only when complete. Not needed for a dry run.
        run_dir: a run folder whose checkpoints the selection settings pick.
        options: the settings as one object; keyword ``settings`` override its fields.
        **settings: any `MergeOptions` field by name, e.g. ``algo="ema", alpha=0.1``.

    Returns:
        What was done: the plan, the output folder, the recipe, the Hub commit URL.

    Raises:
        MergeError: bad settings, inputs or output path, named, before anything is written.
        HubPushError: the push failed; the merged folder is kept.
    """
    started = time.perf_counter()
    options = resolve_options(options, settings)
    target = options.hub_target()  # a bad push target fails here, before any work
    if output is None and not options.dry_run:
        raise MergeError("Give an `output` folder for the merged model.")
    output, run_dir = _expand_user(output), _expand_user(run_dir)
    scratch = Path(tempfile.mkdtemp(prefix="pmakit-merge-"))
    try:
        plan = plan_merge(models, run_dir=run_dir, options=options, scratch=scratch)
        recipe = _recipe(plan, options)
        if options.check_scopes:
            warn_on_scope_differences([folder_scopes(s.path) for s in plan.sources], options.scope_threshold)
        if options.dry_run:
            return MergeResult(plan=plan, recipe=recipe, seconds=time.perf_counter() - started)
        result = _write_output(plan, Path(output), recipe, options)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if target is not None:
        result.commit_url = _push(result.output, target, plan)
    result.seconds = time.perf_counter() - started
    return result


def _expand_user(path: str | os.PathLike | None) -> Path | None:
    """``~`` means the home folder in every path a user gives (recipes and the CLI pass strings through)."""
    return None if path is None else Path(path).expanduser()


def _portable_label(source: ModelSource, folder: Path) -> str:
    """A Hub input as its id; a local one as a path relative to ``folder`` (``./`` or ``../`` first).

    The card and recipe of a merged folder travel (to the Hub, to colleagues): they must not hold
    the user's absolute directory layout. `load_recipe` reads ``./``/``../`` paths relative to the
    recipe file, so the recipe inside the merged folder still runs from anywhere.
    """
    if source.hub_id is not None:
        return source.label
    relative = os.path.relpath(source.path, folder)
    return relative if relative.startswith("..") else f"./{relative}"


def _portable_recipe(recipe: dict, plan: MergePlan, label) -> dict:
    """The recipe with local inputs as relative paths and no output (give ``-o`` / ``output=`` to re-run)."""
    recipe = {k: v for k, v in recipe.items() if k != "output"}
    recipe["models"] = [label(s) for s in plan.sources]
    if plan.base is not None:
        recipe["base_model"] = label(plan.base)
    return recipe


def _write_output(plan: MergePlan, output: Path, recipe: dict, options: MergeOptions) -> MergeResult:
    """Build the whole output folder in a temporary sibling and move it into place, holding its lock."""
    _check_output(output, plan, options.overwrite)
    label = functools.partial(_portable_label, folder=output.resolve())
    recipe = _portable_recipe(recipe, plan, label)
    with output_lock(output), atomic_directory(output, overwrite=options.overwrite) as tmp:
        (tmp / "README.md").write_text(_card(plan, recipe, output.name, label), encoding="utf-8")
        (tmp / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        _copy_side_files(plan, tmp, options.save_tokenizer)
        index = _write_tensors(plan, tmp, options)
        if len(plan.shard_names) > 1:
            index_name = plan.shard_names[0].split("-")[0] + ".safetensors.index.json"
            (tmp / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return MergeResult(plan=plan, output=output, recipe=recipe)


def _write_tensors(plan: MergePlan, folder: Path, options: MergeOptions) -> dict:
    """Stream the fold into the shards of ``folder``; return the shard index."""
    writer = ShardWriter(folder, [t.out for t in plan.tensors], plan.shard_names)
    bar = _progress_bar(plan.bytes_to_write, options.progress)
    try:
        run_fold(
            plan,
            writer,
            threads=options.threads,
            allow_nonfinite=options.allow_nonfinite,
            block_elements=options.block_elements,
            reader=options.reader,
            progress=bar.update if bar is not None else None,
        )
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    return writer.index()


def _push(folder: Path, target: HubTarget, plan: MergePlan) -> str:
    """Upload the finished folder; the default commit message names the rule."""
    if target.commit_message is None:
        message = f"Upload {plan.rule.describe(len(plan.sources))} merged with pmakit"
        target = dataclasses.replace(target, commit_message=message)
    from ..io.hub import push_folder_to_hub  # imported here: local merges start without huggingface_hub

    return push_folder_to_hub(folder, target)
