"""Checking the inputs against each other and deciding, per output tensor, what to do with it.

All validation happens here, from the safetensors headers and ``config.json`` alone, before a
single weight is read or an output byte written: a merge of hundreds of checkpoints should not
fail at its last tensor because one file was truncated.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..averaging import AveragingRule
from ..errors import MergeError
from ..io.safetensors import OutputTensor, TensorInfo, canonical_dtype, parse_size, plan_shards
from .sources import ModelSource


__all__ = ["DEFAULT_BACKBONE_PATTERNS", "MergePlan", "PlannedTensor", "build_plan"]

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


@dataclass
class PlannedTensor:
    """One output tensor: ``action`` is ``"merge"`` (weighted fold of every input), ``"base"``
    (copied from the base model: backbone-only) or ``"equal"`` (integer/bool tensors, copied after
    checking every input holds the same values)."""

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

    @property
    def bytes_to_read(self) -> int:
        return sum(i.nbytes for t in self.tensors for i in t.inputs)

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
        counts = {a: sum(t.action == a for t in self.tensors) for a in ("merge", "base", "equal")}
        lines.append(
            f"  merged {counts['merge']}, from base {counts['base']}, integer/bool copied {counts['equal']}; "
            f"config and tokenizer from {self.donor.label}"
        )
        lines.append(f"  reads {_human(self.bytes_to_read)}, writes {_human(self.bytes_to_write)}")
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def _arch(source: ModelSource) -> tuple[str | None, tuple[str, ...]]:
    config = source.config
    return config.get("model_type"), tuple(config.get("architectures") or ())


def _tied(config: dict) -> bool:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


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
) -> MergePlan:
    """Validate loaded ``sources`` (oldest first) and plan every output tensor."""
    sources = list(sources)
    if not sources:
        raise MergeError("Nothing to merge: no inputs.")
    try:
        weights = rule.weights_for(len(sources))
    except ValueError as e:
        raise MergeError(str(e)) from e
    acc = canonical_dtype(accumulate_dtype, "accumulate_dtype")
    if acc not in ACCUMULATE_DTYPES:
        raise MergeError(f"`accumulate_dtype` must be float32 or float64, got {accumulate_dtype!r}.")
    out_code = canonical_dtype(out_dtype) if out_dtype is not None else None
    shard_bytes = parse_size(max_shard_size)
    donor = base if base is not None else sources[-1]

    reference_arch = _arch(donor)
    for s in [*sources, *([base] if base is not None else [])]:
        arch = _arch(s)
        if s.config and donor.config and arch != reference_arch:
            raise MergeError(
                f"Inputs have different architectures: {s.label} is {arch[0]} {list(arch[1])}, "
                f"{donor.label} is {reference_arch[0]} {list(reference_arch[1])}."
            )
    if len({s.is_adapter for s in sources}) > 1:
        raise MergeError("Cannot merge PEFT adapter folders with full model folders.")

    tied = _tied(donor.config)
    first = sources[0]

    def names_of(s: ModelSource) -> list[str]:
        return [n for n in s.tensors if not (tied and n == "lm_head.weight")]

    order = names_of(first)
    wanted = set(order)
    for s in sources[1:]:
        have = set(names_of(s))
        missing = sorted(wanted - have)
        if missing:
            raise MergeError(f"Tensor {missing[0]!r} is missing from input {s.label} (present in {first.label}).")
        extra = sorted(have - wanted)
        if extra:
            raise MergeError(f"Tensor {extra[0]!r} of input {s.label} is missing from input {first.label}.")

    patterns = tuple(backbone_patterns) if backbone_patterns is not None else DEFAULT_BACKBONE_PATTERNS
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as e:
        raise MergeError(f"Bad backbone pattern: {e}.") from e
    if backbone_only:
        if base is None:
            raise MergeError(
                "backbone_only needs a base model (`base_model`) to take embeddings, LM head and final norm from."
            )
    planned: list[PlannedTensor] = []
    kept_from_base = 0
    for name in order:
        infos = [s.tensors[name] for s in sources]
        ref = infos[-1]
        if backbone_only and any(p.search(name) for p in compiled):
            if name not in base.tensors:
                raise MergeError(f"backbone_only: base model {base.label} has no tensor {name!r}.")
            info = base.tensors[name]
            dtype = out_code if (out_code and info.is_float) else info.dtype
            planned.append(PlannedTensor(OutputTensor(name, dtype, info.shape), "base", [info]))
            kept_from_base += 1
            continue
        for info in infos:
            if info.shape != ref.shape:
                raise MergeError(
                    f"Shape mismatch for tensor {name!r}: {list(info.shape)} in {info.file} "
                    f"but {list(ref.shape)} in {ref.file}."
                )
            if info.is_float != ref.is_float:
                raise MergeError(f"Tensor {name!r} is {info.dtype} in {info.file} but {ref.dtype} in {ref.file}.")
        if ref.is_float:
            dtype = out_code or ref.dtype
            planned.append(PlannedTensor(OutputTensor(name, dtype, ref.shape), "merge", infos))
        else:
            if any(i.dtype != ref.dtype for i in infos):
                odd = next(i for i in infos if i.dtype != ref.dtype)
                raise MergeError(f"Tensor {name!r} is {odd.dtype} in {odd.file} but {ref.dtype} in {ref.file}.")
            planned.append(PlannedTensor(OutputTensor(name, ref.dtype, ref.shape), "equal", infos))
    if backbone_only and kept_from_base == 0:
        raise MergeError(
            f"backbone_only: no tensor matches the backbone patterns {list(patterns)}; "
            "pass `backbone_patterns` for this architecture."
        )
    stem = "adapter_model" if first.is_adapter else "model"
    shard_names = plan_shards([t.out for t in planned], shard_bytes, stem=stem)
    return MergePlan(
        sources=sources,
        base=base,
        donor=donor,
        rule=rule,
        weights=weights,
        tensors=planned,
        shard_names=shard_names,
        accumulate_dtype=ACCUMULATE_DTYPES[acc],
        max_shard_size=shard_bytes,
        backbone_only=backbone_only,
        backbone_patterns=patterns,
        out_dtype=out_code,
    )


def input_files(plan: MergePlan) -> list[Path]:
    """Every file the merge reads (for read-once measurements and inspection)."""
    seen: dict[Path, None] = {}
    for t in plan.tensors:
        for i in t.inputs:
            for f in i.files:
                seen.setdefault(f, None)
    return list(seen)
