"""`MergeOptions`: every setting of a merge other than its inputs and its output, in one place.

The Python API (``merge(..., options=...)`` or keywords), the YAML recipe schema and the flags of
``pmakit average`` / ``pmakit merge`` are all read off these fields, so a setting is defined once,
with its type, default, validation and the help text the docs and ``--help`` show.

Field metadata:

- ``help``: one line for ``--help`` and the docs table.
- ``flag``: the command-line flag when it is not ``--field-name`` (``"--no-normalize"``); ``None``
  for a setting with no flag (``token``: it comes from the environment or the saved login).
- ``flag_help``: the flag's own help where the flag turns a default off (``--no-tokenizer``).
- ``const_flags``: ``(flag, value, help)`` of flags without an argument that store a value
  (``--pma`` stores ``kind="pma"``).
- ``metavar``: the placeholder shown in ``--help``.
- ``choices``: the valid values (the CLI offers them; ``__post_init__`` enforces them).
- ``recipe``: ``False`` for run-time settings (progress bar, dry run, token, threads...) that are
  neither read from nor written to recipe files.
- ``group``: ``"selection"`` for the run-folder selection, shared with ``pmakit inspect``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from ..averaging import (
    ALGORITHMS,
    AveragingRule,
    MissingParameterError,
    UnusedParameterError,
    parse_spec,
    rule_class,
)
from ..deprecation import REMOVED_IN
from ..errors import InputError, MergeError, brief
from ..io.dtype_names import canonical_dtype, parse_size
from ..io.hub_target import HubTarget, as_hub_target
from .sources import KINDS


__all__ = ["CONFIG_SOURCES", "MergeOptions", "option_fields", "recipe_fields"]

CONFIG_SOURCES: tuple[str, ...] = ("base", "first", "newest")
READERS: tuple[str, ...] = ("mmap", "pread")
ACCUMULATE_DTYPES: tuple[str, ...] = ("float32", "float64")
# The fold's block: 1 MiB of fp32 accumulator stays in cache while the inputs stream by. Declared here, not
# in `stream`, so that the options (and the command line's parser) load without numpy.
DEFAULT_BLOCK_ELEMENTS = 1 << 18


def _opt(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with its help text and CLI/recipe metadata."""
    return field(default=default, metadata={"help": help, **meta})


def _old_hub_opt(default: Any, name: str, flag_help: str, metavar: str | None = None) -> Any:
    """A separate Hub setting, deprecated in Python (it goes in the `HubTarget`); its CLI flag stays."""
    help = f"Deprecated (removed in {REMOVED_IN}): write `push_to_hub=HubTarget(repo_id, {name}=...)`."
    return _opt(default, help, flag_help=flag_help, **({"metavar": metavar} if metavar else {}))


@dataclass(frozen=True)
class MergeOptions:
    """How to merge: selection, averaging rule, base model, dtypes, output format, Hub push, run-time knobs.

    Every field is validated when the object is built, so a bad setting fails before any file is
    read; messages name the field. Use ``dataclasses.replace(options, field=value)`` to change one.

    Raises:
        MergeError: a setting has the wrong type or an invalid value, or settings contradict each other.
    """

    # which checkpoints of a run folder
    last: int | None = _opt(None, "Keep the newest N checkpoints of the run folder.", group="selection", metavar="N")
    every: int | None = _opt(
        None,
        "Keep checkpoints V steps apart, counted back from the newest.",
        group="selection",
        metavar="V",
    )
    start: int | None = _opt(None, "First step of the run folder to consider.", group="selection", metavar="STEP")
    end: int | None = _opt(None, "Last step of the run folder to consider.", group="selection", metavar="STEP")
    kind: str = _opt(
        "checkpoint",
        "What to read from a run folder: checkpoint-N folders' weights (checkpoint), pma-N folders "
        "(pma: online PMA's merged models) or checkpoint-N folders' PMA average stored in their "
        "optimizer state (pma-state: FSDP DCP `optimizer_0/`, DeepSpeed ZeRO).",
        group="selection",
        const_flags=(
            ("--pma", "pma", "Select pma-N folders instead of checkpoint-N."),
            (
                "--pma-state",
                "pma-state",
                "Read checkpoint-N folders' PMA average from their optimizer state (FSDP DCP `optimizer_0/`) "
                "instead of their weights.",
            ),
        ),
        choices=KINDS,
    )
    # the averaging rule
    algo: str = _opt(
        "sma",
        "Averaging rule (`pmakit.AveragingRule`): sma equal weights, wma weights 1..n (newest most), ema "
        "with `alpha` (not always newest most: see `alpha`), weights with `weights`; the choices list every "
        "rule of this pmakit. A dry run prints each input's weight. A rule spec gives parameters that have no "
        "option of their own: `ema_halflife:0.1`, `bema:ema_power=0.5,lag=10`.",
        choices=ALGORITHMS,
        spec=True,
    )
    alpha: float = _opt(
        0.2,
        "EMA weight of the newest sample, in (0, 1). The EMA starts at the first sample, so the oldest keeps "
        "(1-alpha)^(n-1) and outweighs the newest while that exceeds alpha: alpha 0.2 over 4 inputs gives "
        "0.512, 0.128, 0.16, 0.2 (oldest first).",
    )
    weights: tuple[float, ...] | None = _opt(
        None,
        "Explicit weights, one per input, oldest first (implies the `weights` rule). Normalized, they may "
        "be negative as long as they do not sum to zero (extrapolation); without normalizing, any values "
        "(e.g. task arithmetic). All-zero weights and a sum of |weights| above 10 warn.",
        metavar="W",
    )
    normalize: bool = _opt(
        True,
        "Divide explicit weights by their sum; off, they are used as given (may be negative).",
        flag="--no-normalize",
        flag_help="Use explicit weights as given, not divided by their sum (may be negative).",
    )
    decay_shape: str | None = _opt(None, "Shape of the `decay` rule (linear, cosine, 1-sqrt).", metavar="SHAPE")
    # base model and backbone
    base_model: str | None = _opt(
        None,
        "Base model folder or Hub id: not averaged; gives config and tokenizer, and the backbone tensors "
        "with `backbone_only`.",
        metavar="MODEL",
    )
    backbone_only: bool = _opt(False, "Keep the embeddings, LM head and final norm of `base_model`; average the rest.")
    backbone_patterns: tuple[str, ...] | None = _opt(
        None,
        "Regex of the tensors kept from the base with `backbone_only`; repeat for several. Replaces the "
        "defaults (embeddings, LM head, final norm: `pmakit.merging.DEFAULT_BACKBONE_PATTERNS`).",
        metavar="REGEX",
        flag="--backbone-pattern",
    )
    config_source: str | None = _opt(
        None,
        "Which input gives config.json, the generation config and the tokenizer: base, first (oldest) "
        "or newest; default the base when given, else the newest input.",
        choices=CONFIG_SOURCES,
    )
    # numerics and output format
    accumulate_dtype: str = _opt(
        "float32",
        "Dtype of the running sum: float32, or float64 for long or extrapolating merges.",
        choices=ACCUMULATE_DTYPES,
    )
    out_dtype: str | None = _opt(
        None, "Dtype of the written floats (float32, bfloat16, float16...); default the inputs'.", metavar="DTYPE"
    )
    max_shard_size: int | str = _opt(
        "5GB", "Largest output shard, in bytes or HF notation (5GB, 500MB, 2GiB).", metavar="SIZE"
    )
    save_tokenizer: bool = _opt(
        True,
        "Copy the tokenizer files of the config source.",
        flag="--no-tokenizer",
        flag_help="Do not copy the tokenizer files.",
    )
    overwrite: bool = _opt(False, "Replace an existing non-empty output folder (atomically, when the merge is done).")
    allow_nonfinite: bool = _opt(False, "Accept NaN/Inf in the inputs instead of refusing them.")
    allow_pickle: bool = _opt(
        False, "Accept pickled checkpoints (.bin, FSDP DCP, DeepSpeed ZeRO), read by an allow-list unpickler."
    )
    # the Hub
    push_to_hub: str | HubTarget | None = _opt(
        None,
        "Push the merged folder to this Hub repo (name or namespace/name) or `pmakit.HubTarget`.",
        metavar="REPO_ID",
    )
    private: bool = _old_hub_opt(False, "private", "Create the Hub repo private (only when it does not exist yet).")
    revision: str | None = _old_hub_opt(None, "revision", "Hub branch to push to (created when missing).", "BRANCH")
    commit_message: str | None = _old_hub_opt(
        None, "commit_message", "Hub commit message; default names the rule and the number of inputs.", "MESSAGE"
    )
    token: str | None = field(
        default=None,
        repr=False,
        metadata={
            "help": "Hub token for downloads and the push; default the HF_TOKEN environment or the saved login.",
            "flag": None,
            "recipe": False,
        },
    )
    cache_dir: str | None = _opt(None, "Hugging Face cache folder for Hub inputs.", metavar="DIR")
    # run time
    threads: int | None = _opt(None, "Worker threads of the fold (default: up to 4).", recipe=False, metavar="N")
    block_elements: int = _opt(
        DEFAULT_BLOCK_ELEMENTS, "Elements folded per block; bounds memory per thread.", recipe=False, metavar="N"
    )
    reader: str = _opt(
        "mmap", "How inputs are read: mmap (page-cache views) or pread (plain reads).", choices=READERS, recipe=False
    )
    progress: bool = _opt(
        False,
        "Show a progress bar (on by default on the command line).",
        flag="--no-progress",
        flag_help="No progress bar.",
        recipe=False,
    )
    dry_run: bool = _opt(False, "Check the inputs and report the plan; write nothing.", recipe=False)
    check_scopes: bool = _opt(
        False,
        "Before merging, warn about layers whose weight mean/std differ across the inputs "
        "(reads every weight once more).",
        recipe=False,
    )
    scope_threshold: float = _opt(
        0.1, "Flag a layer when max(std ratio - 1, mean spread / std) exceeds this.", recipe=False
    )

    def __post_init__(self) -> None:
        hints = _field_types()
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _checked(f.name, getattr(self, f.name), hints[f.name]))
        _check_choices(self)
        _check_ranges(self)
        _check_formats(self)
        _fold_hub_settings(self)
        self.rule()

    def rule(self) -> AveragingRule:
        """The averaging rule these options describe (``weights`` given with ``sma`` means the weights rule).

        Raises:
            MergeError: the rule settings are inconsistent (e.g. ``alpha`` outside (0, 1)).
        """
        algo = "weights" if self.weights is not None and self.algo == "sma" else self.algo
        try:
            algo, params = parse_spec(algo) if ":" in algo else (algo, {})  # e.g. ema_halflife:0.05
            params = params or None
            return AveragingRule(algo, self.alpha, self.weights, self.normalize, self.decay_shape, params=params)
        except UnusedParameterError as e:
            raise MergeError(f"`{e.param}` cannot be combined with `algo={brief(self.algo)}`.") from e
        except MissingParameterError as e:
            expects = rule_class(algo).param(e.param).describe_value()
            raise MergeError(f"`algo={brief(algo)}` needs `{e.param}`: {expects}.") from e
        except ValueError as e:
            raise MergeError(str(e)) from e

    def hub_target(self, default_message: str | None = None) -> HubTarget | None:
        """Where the merged folder goes on the Hub (the options' ``token`` unless the target has one), or None."""
        target = self.push_to_hub
        if target is None:
            return None
        message = target.commit_message or default_message
        return dataclasses.replace(target, token=target.token or self.token, commit_message=message)

    def recipe_settings(self) -> dict[str, Any]:
        """The recipe fields whose value differs from the default (a minimal, reproducible recipe)."""
        defaults = MergeOptions()
        return {
            f.name: _plain(getattr(self, f.name))
            for f in recipe_fields()
            if getattr(self, f.name) != getattr(defaults, f.name)
        }


@functools.cache
def _field_types() -> dict[str, Any]:
    """The fields' evaluated type hints (annotations are strings under ``from __future__ import annotations``)."""
    return typing.get_type_hints(MergeOptions)


def option_fields() -> tuple[dataclasses.Field, ...]:
    """Every field of `MergeOptions`, in declaration order (the order of ``--help`` and the docs)."""
    return dataclasses.fields(MergeOptions)


def recipe_fields() -> tuple[dataclasses.Field, ...]:
    """The fields a YAML recipe may set (everything but the run-time settings)."""
    return tuple(f for f in option_fields() if f.metadata.get("recipe", True))


def _plain(value: Any) -> Any:
    """A YAML-friendly value: tuples become lists, a `HubTarget` the recipe's mapping (never its token)."""
    if isinstance(value, HubTarget):
        fields = dataclasses.asdict(value)
        return {k: v for k, v in fields.items() if k != "token" and v != getattr(HubTarget, k, None)}
    return list(value) if isinstance(value, tuple) else value


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, type(int | None)):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _checked(name: str, value: Any, hint: Any) -> Any:
    """``value`` converted to the field's type (paths to str, lists to tuples, ints to float), else MergeError."""
    converted = _convert(value, hint)
    if converted is _MISMATCH:
        raise MergeError(f"`{name}` must be {_type_name(hint)}, got {brief(value)} ({type(value).__name__}).")
    return converted


_MISMATCH = object()


def _convert(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, type(int | None)):
        for arg in typing.get_args(hint):
            converted = _convert(value, arg)
            if converted is not _MISMATCH:
                return converted
        return _MISMATCH
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return _MISMATCH
        items = [_convert(v, typing.get_args(hint)[0]) for v in value]
        return _MISMATCH if any(i is _MISMATCH for i in items) else tuple(items)
    return _convert_scalar(value, hint)


def _convert_scalar(value: Any, hint: Any) -> Any:
    if hint is type(None):
        return None if value is None else _MISMATCH
    if hint is bool:
        return value if isinstance(value, bool) else _MISMATCH
    if isinstance(value, bool):
        return _MISMATCH
    if hint is int:
        return value if isinstance(value, int) else _MISMATCH
    if hint is float:
        return float(value) if isinstance(value, (int, float)) else _MISMATCH
    if hint is str:
        return os.fspath(value) if isinstance(value, (str, os.PathLike)) else _MISMATCH
    if hint is HubTarget:
        return value if isinstance(value, HubTarget) else _MISMATCH
    return _MISMATCH  # pragma: no cover - every field type is handled above


def _check_choices(options: MergeOptions) -> None:
    for f in option_fields():
        choices = f.metadata.get("choices")
        value = getattr(options, f.name)
        if f.name == "algo" and isinstance(value, str):
            value = value.partition(":")[0]  # a spec's rule name (its parameters are the rule's to check)
        if choices is not None and value is not None and value not in choices:
            raise MergeError(f"`{f.name}` must be one of {', '.join(choices)}; got {brief(value)}.")
    if options.config_source == "base" and options.base_model is None:
        raise MergeError("`config_source='base'` needs a `base_model`.")
    if options.backbone_only and options.base_model is None:
        raise MergeError("backbone_only needs a base model: give `base_model`.")


def _check_ranges(options: MergeOptions) -> None:
    for name in ("last", "every", "threads", "block_elements"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise MergeError(f"`{name}` must be a positive integer, got {brief(value)}.")
    for name in ("start", "end"):
        value = getattr(options, name)
        if value is not None and value < 0:
            raise MergeError(f"`{name}` must be a step >= 0, got {brief(value)}.")
    if options.start is not None and options.end is not None and options.start > options.end:
        raise MergeError(f"The step range is empty: start={options.start} > end={options.end}.")
    if not options.scope_threshold > 0:
        raise MergeError(f"`scope_threshold` must be positive, got {brief(options.scope_threshold)}.")


def _check_formats(options: MergeOptions) -> None:
    try:
        parse_size(options.max_shard_size)
        if options.out_dtype is not None:
            canonical_dtype(options.out_dtype, "out_dtype")
    except (InputError, ValueError) as e:
        raise MergeError(str(e)) from e


def _fold_hub_settings(options: MergeOptions) -> None:
    """``push_to_hub`` becomes one `HubTarget`; the deprecated separate Hub fields are folded into it (warned)."""
    legacy = dict(private=options.private or None, revision=options.revision, commit_message=options.commit_message)
    try:
        target = as_hub_target(options.push_to_hub, where="MergeOptions", **legacy)
    except InputError as e:
        message = str(e)
        raise MergeError(message if "`" in message else f"`push_to_hub`: {message}") from e
    for name, value in {"push_to_hub": target, "private": False, "revision": None, "commit_message": None}.items():
        object.__setattr__(options, name, value)
