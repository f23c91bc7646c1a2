"""Deciding, per output tensor, what a merge does with it, once the inputs are checked against each other.

All validation happens before a single weight is read or an output byte written, from the
safetensors headers and ``config.json`` alone (here, in `pmakit.merging.checks` and, for the LM
head, `pmakit.merging.heads`): a merge of hundreds of checkpoints should not fail at its last tensor
because one file was truncated.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..averaging import COPIED_FROM_NEWEST, AveragingRule, tensor_merge_action
from ..errors import MergeError, brief
from ..io.dtype_names import format_size
from ..io.safetensors import OutputTensor, TensorInfo, canonical_dtype, parse_size, plan_shards
from .checks import check_alike, check_architectures, rule_weights
from .heads import LM_HEAD, common_tensor_names, is_tied, lm_head_inputs, output_tied
from .sources import ModelSource


__all__ = ["DEFAULT_BACKBONE_PATTERNS", "DONORS", "MergePlan", "PlannedTensor", "build_plan", "choose_donor"]

# Tensors kept from the base model when merging the backbone only: token/position embeddings,
# the LM head and the final norm, as named by common architectures (Llama/Mistral/Qwen/Gemma,
# GPT-2/GPT-J, GPT-NeoX/Pythia, OPT, Falcon, Phi, BLOOM). Regexes searched in the tensor name.
DEFAULT_BACKBONE_PATTERNS: tuple[str, ...] = (
    r"(^|\.)embed_tokens\.",
    r"(^|\.)embed_positions\.",
    r"(^|\.)(wte|wpe)\.",
    r"(^|\.)word_embeddings(_layernorm)?\.",
    r"(^|\.)embed_in\.",
    r"^(lm_head|embed_out|output)\.",
    r"^(model|transformer|gpt_neox|model\.decoder)\.(norm|ln_f|final_layer_norm|final_layernorm)\.",
)

ACCUMULATE_DTYPES = {"F32": "float32", "F64": "float64"}

# Which input gives config.json, generation config and tokenizer (`build_plan(donor=...)`; None: the base when
# given, else the newest input).
DONORS: tuple[str, ...] = ("first", "newest", "base")


@dataclass
class PlannedTensor:
    """One output tensor: ``action`` is ``"merge"`` (weighted fold of every input), ``"base"``
    (copied from the base model: backbone-only) or ``"newest"`` (integer/bool tensors, copied from
    the newest input by the buffer rule, `pmakit.averaging.tensor_merge_action`)."""

    out: OutputTensor
    action: str
    inputs: list[TensorInfo]


@dataclass
class MergePlan:
    """What a merge will read and write; :func:`build_plan` makes it, the fold executes it."""

    sources: list[ModelSource]
    base: ModelSource | None
    donor: ModelSource
    rule: AveragingRule
    weights: list[float]
    tensors: list[PlannedTensor]
    shard_names: list[str]
    accumulate_dtype: str
    max_shard_size: int
    backbone_only: bool = False
    backbone_patterns: tuple[str, ...] = ()
    out_dtype: str | None = None
    # ``tie_word_embeddings`` for the output's config.json when it differs from the donor's, else None
    tie_word_embeddings: bool | None = None

    @property
    def bytes_to_read(self) -> int:
        return sum(i.nbytes for t in self.tensors for i in t.inputs)

    @property
    def copied_from_newest(self) -> list[str]:
        """Names of the integer/bool tensors taken from the newest input instead of averaged."""
        return [t.out.name for t in self.tensors if t.action == "newest"]

    def card_details(self) -> list[tuple[str, str]]:
        """Model-card sections (title, markdown) naming every tensor that was not averaged, and where it came from."""
        details = []
        kept = [t.out.name for t in self.tensors if t.action == "base"]
        if kept:
            details.append(("Backbone only", f"Taken unchanged from `{self.base.label}`: {_names(kept)}."))
        copied = self.copied_from_newest
        if copied:
            text = (
                f"Integer/bool tensors are not averaged; taken unchanged from the newest input "
                f"`{self.sources[-1].label}`: {_names(copied)}."
            )
            details.append(("Copied from the newest input", text))
        return details

    @property
    def bytes_to_write(self) -> int:
        return sum(t.out.nbytes for t in self.tensors)

    def describe(self) -> str:
        """A human summary (``--dry-run``): inputs with weights, what is merged, read and written."""
        lines = [
            f"{self.rule.describe(len(self.sources))} -> {len(self.tensors)} tensors "
            f"in {len(self.shard_names)} shard(s)"
        ]
        for source, weight in zip(self.sources, self.weights, strict=True):
            step = f" (step {source.step})" if source.step is not None else ""
            lines.append(f"  {weight:+.6g}  {source.label}{step}")
        if self.base is not None:
            lines.append(f"  base: {self.base.label}")
        counts = {a: sum(t.action == a for t in self.tensors) for a in ("merge", "base", "newest")}
        lines.append(
            f"  merged {counts['merge']}, from base {counts['base']}, "
            f"copied from the newest input {counts['newest']} (integer/bool); "
            f"config and tokenizer from {self.donor.label}"
        )
        lines.append(f"  reads {format_size(self.bytes_to_read)}, writes {format_size(self.bytes_to_write)}")
        return "\n".join(lines)


def _names(names: list[str]) -> str:
    return ", ".join(f"`{n}`" for n in names)


def _accumulate_dtype(name: str) -> str:
    """The numpy name of the accumulator dtype; only float32 and float64 accumulate safely."""
    code = canonical_dtype(name, "accumulate_dtype")
    if code not in ACCUMULATE_DTYPES:
        raise MergeError(f"`accumulate_dtype` must be float32 or float64, got {brief(name)}.")
    return ACCUMULATE_DTYPES[code]


def choose_donor(sources: Sequence[ModelSource], base: ModelSource | None, donor: str | None) -> ModelSource:
    """The input whose config, generation config and tokenizer the output gets.

    Args:
        sources: the inputs, oldest first.
        base: the base model, if any.
        donor: ``None`` (the base when given, else the newest input), ``"first"`` (the oldest
            input), ``"newest"`` or ``"base"`` (needs a base).

    Returns:
        The chosen source.

    Raises:
        MergeError: ``donor`` is not one of :data:`DONORS`, or is ``"base"`` without a base.
    """
    if donor is not None and donor not in DONORS:
        raise MergeError(f"`donor` must be one of {', '.join(DONORS)} (or None), got {brief(donor)}.")
    if donor == "base" and base is None:
        raise MergeError("`donor='base'` needs a base model (`base_model`).")
    if donor == "first":
        return sources[0]
    if donor == "newest" or base is None:
        return sources[-1]
    return base


def _backbone(backbone_only: bool, patterns: tuple[str, ...], base: ModelSource | None) -> list[re.Pattern] | None:
    """The compiled backbone patterns for a backbone-only merge (checked always), else ``None``."""
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as e:
        raise MergeError(f"Bad backbone pattern: {e}.") from e
    if not backbone_only:
        return None
    if base is None:
        raise MergeError(
            "backbone_only needs a base model (`base_model`) to take embeddings, LM head and final norm from."
        )
    return compiled


def _check_backbone_matched(planned: list[PlannedTensor], backbone_only: bool, patterns: tuple[str, ...]) -> None:
    if backbone_only and not any(t.action == "base" for t in planned):
        raise MergeError(
            f"backbone_only: no tensor matches the backbone patterns {list(patterns)}; "
            "pass `backbone_patterns` for this architecture."
        )


def _from_base(name: str, base: ModelSource, out_code: str | None) -> PlannedTensor:
    """Backbone-only: the tensor is copied from the base model (cast when ``out_dtype`` is set)."""
    if name not in base.tensors:
        raise MergeError(f"backbone_only: base model {base.label} has no tensor {brief(name)}.")
    info = base.tensors[name]
    dtype = out_code if (out_code and info.is_float) else info.dtype
    return PlannedTensor(OutputTensor(name, dtype, info.shape), "base", [info])


def _from_inputs(name: str, sources: list[ModelSource], out_code: str | None) -> PlannedTensor:
    """Floats are folded from every input; integers and bools are copied from the newest (the buffer rule)."""
    infos = lm_head_inputs(sources) if name == LM_HEAD else [s.tensors[name] for s in sources]
    check_alike(name, infos)
    newest = infos[-1]
    odd = next((i for i in infos if i.dtype != newest.dtype), None)
    if odd is not None and out_code is None and newest.is_float:
        raise MergeError(
            f"Tensor {brief(name)} is {odd.dtype} in {odd.file} but {newest.dtype} in {newest.file}; "
            "choose the output dtype with out_dtype=...."
        )
    if tensor_merge_action(newest.is_float) == COPIED_FROM_NEWEST:
        return PlannedTensor(OutputTensor(name, newest.dtype, newest.shape), "newest", [newest])
    return PlannedTensor(OutputTensor(name, out_code or newest.dtype, newest.shape), "merge", infos)


def _plan_tensors(
    names: list[str],
    sources: list[ModelSource],
    base: ModelSource | None,
    backbone: list[re.Pattern] | None,
    out_code: str | None,
) -> list[PlannedTensor]:
    """One planned tensor per name; ``backbone`` (patterns) is given for backbone-only merges."""
    planned = []
    for name in names:
        if backbone is not None and any(p.search(name) for p in backbone):
            planned.append(_from_base(name, base, out_code))
        else:
            planned.append(_from_inputs(name, sources, out_code))
    return planned


def build_plan(
    sources: Sequence[ModelSource],
    rule: AveragingRule,
    *,
    base: ModelSource | None = None,
    backbone_only: bool = False,
    backbone_patterns: Sequence[str] | None = None,
    accumulate_dtype: str = "float32",
    out_dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    donor: str | None = None,
) -> MergePlan:
    """Validate loaded ``sources`` (oldest first) and plan every output tensor, from headers alone.

    Args:
        sources: the loaded inputs, oldest first.
        rule: the averaging rule that gives each input its weight.
        base: the base model (backbone-only source; default donor of config and tokenizer).
        backbone_only: keep the tensors matching ``backbone_patterns`` from ``base``.
        backbone_patterns: regexes searched in tensor names (default :data:`DEFAULT_BACKBONE_PATTERNS`).
        accumulate_dtype: ``"float32"`` or ``"float64"``.
        out_dtype: floating dtype of the merged floats (default: the inputs' dtype).
        max_shard_size: bytes per output shard (int or ``"5GB"``-style text).
        donor: which input gives config and tokenizer; see :func:`choose_donor`.

    Returns:
        The plan: per output tensor, merged / from base / copied from the newest input.

    Raises:
        MergeError: no inputs, a bad setting (naming it), or inputs that do not fit together.
    """
    sources = list(sources)
    if not sources:
        raise MergeError("Nothing to merge: no inputs.")
    weights = rule_weights(rule, sources)
    accumulate = _accumulate_dtype(accumulate_dtype)
    out_code = canonical_dtype(out_dtype) if out_dtype is not None else None
    shard_bytes = parse_size(max_shard_size)
    donor_source = choose_donor(sources, base, donor)
    check_architectures(sources, base, donor_source)
    tied = output_tied(sources, base, backbone_only)
    names = common_tensor_names(sources, tied)
    patterns = tuple(backbone_patterns) if backbone_patterns is not None else DEFAULT_BACKBONE_PATTERNS
    planned = _plan_tensors(names, sources, base, _backbone(backbone_only, patterns, base), out_code)
    _check_backbone_matched(planned, backbone_only, patterns)
    stem = "adapter_model" if sources[0].is_adapter else "model"
    return MergePlan(
        sources=sources,
        base=base,
        donor=donor_source,
        rule=rule,
        weights=weights,
        tensors=planned,
        shard_names=plan_shards([t.out for t in planned], shard_bytes, stem=stem),
        accumulate_dtype=accumulate,
        max_shard_size=shard_bytes,
        backbone_only=backbone_only,
        backbone_patterns=patterns,
        out_dtype=out_code,
        tie_word_embeddings=tied if tied != is_tied(donor_source.config) else None,
    )


def input_files(plan: MergePlan) -> list[Path]:
    """Every file the merge reads (for read-once measurements and inspection)."""
    seen: dict[Path, None] = {}
    for t in plan.tensors:
        for i in t.inputs:
            for f in i.files:
                seen.setdefault(f, None)
    return list(seen)
