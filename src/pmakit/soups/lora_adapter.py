"""One PEFT LoRA adapter folder: its config, its factors, and the exact updates ``s * B @ A`` they make.

`pmakit.soups.lora` averages adapters read here. A LoRA module changes a base weight by
``delta = s * B @ A``, ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA; per-module
values from ``rank_pattern`` / ``alpha_pattern``). Only LoRA is read: DoRA, ``lora_bias`` and pickled
``adapter_model.bin`` files are refused with a message that says so.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import InputError, brief
from .weighted_sum import weighted_sum


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LoraAdapter", "base_name", "load_lora_adapter", "lora_deltas"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."  # PEFT's prefix of the base model's names
_LORA_RE = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?P<suffix>\.weight)?$"
)


def base_name(key: str) -> str:
    """A module or tensor name of the adapter as the base model names it (without PEFT's prefix)."""
    return key.removeprefix(_PREFIX)


@dataclass
class LoraAdapter:
    """One adapter folder: its config and tensors (loaded on CPU)."""

    path: Path
    config: dict
    tensors: dict[str, torch.Tensor]

    def modules(self) -> dict[str, dict[str, str]]:
        """``{module key prefix: {"A": key, "B": key}}`` for every LoRA module of the adapter."""
        found: dict[str, dict[str, str]] = {}
        for key in self.tensors:
            m = _LORA_RE.match(key)
            if m:
                found.setdefault(m["module"], {})["A" if m["kind"].endswith("A") else "B"] = key
        for module, pair in found.items():
            if set(pair) != {"A", "B"}:
                raise InputError(f"{self.path}: LoRA module {brief(module)} has only its {next(iter(pair))} factor.")
        return found

    def extras(self) -> list[str]:
        """Tensors that are not LoRA factors (modules_to_save, trainable tokens): averaged linearly."""
        return [k for k in self.tensors if not _LORA_RE.match(k)]

    def scaling(self, module: str) -> float:
        """``s`` of ``delta = s * B @ A`` for a module (rank from the tensors, alpha from the config)."""
        rank = self.tensors[self.modules()[module]["A"]].shape[0]
        alpha = _pattern_value(
            self.config.get("alpha_pattern") or {}, base_name(module), self.config.get("lora_alpha", 8)
        )
        if self.config.get("use_rslora"):
            return float(alpha) / math.sqrt(rank)
        return float(alpha) / rank


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank/alpha pattern lookup: a key matches the module's full name or a dotted suffix of it."""
    for key, value in patterns.items():
        if module == key or re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def load_lora_adapter(path: str | os.PathLike) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    folder = Path(path)
    config_file, weights_file = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: {ADAPTER_CONFIG} is missing.")
    if not weights_file.is_file():
        extra = ""
        if (folder / "adapter_model.bin").exists():
            extra = " (pickled adapter_model.bin is not read; re-save it with safetensors)"
        raise FileNotFoundError(f"{folder}: {ADAPTER_WEIGHTS} is missing{extra}.")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InputError(f"{folder}: only LoRA adapters can be averaged here; this one is {brief(peft_type)}.")
    if config.get("use_dora"):
        raise InputError(
            f"{folder}: DoRA adapters (use_dora=true) have a magnitude vector that does not average "
            "like B @ A; they are not supported."
        )
    if config.get("lora_bias"):
        raise InputError(f"{folder}: adapters with lora_bias=true are not supported.")
    try:
        tensors = load_file(weights_file)
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise InputError(f"{weights_file} cannot be read as safetensors: {err}") from err
    adapter = LoraAdapter(folder, config, tensors)
    if not adapter.modules():
        raise InputError(f"{weights_file} holds no LoRA factors (lora_A / lora_B tensors).")
    return adapter


def _delta(adapter: LoraAdapter, module: str, dtype=torch.float64) -> torch.Tensor:
    """``s * B @ A`` in the base weight's layout (embeddings and fan_in_fan_out layers transposed)."""
    keys = adapter.modules()[module]
    a, b = adapter.tensors[keys["A"]].to(dtype), adapter.tensors[keys["B"]].to(dtype)
    delta = b.flatten(1) @ a.flatten(1)
    if "lora_embedding" in keys["A"] or adapter.config.get("fan_in_fan_out"):
        delta = delta.T
    return adapter.scaling(module) * delta


def lora_deltas(
    adapters: Sequence[LoraAdapter], weights: Sequence[float], dtype=torch.float64
) -> dict[str, torch.Tensor]:
    """The exact weighted average of the updates, ``{module: sum_i w_i s_i B_i A_i}`` (dense; for checks).

    A module that only some adapters adapt gets the terms of those adapters (the others add zero).
    """
    terms: dict[str, tuple[list[torch.Tensor], list[float], list[Path]]] = {}
    for adapter, w in zip(adapters, weights, strict=True):
        for module in adapter.modules():
            deltas, ws, paths = terms.setdefault(module, ([], [], []))
            deltas.append(_delta(adapter, module, dtype))
            ws.append(w)
            paths.append(adapter.path)
    return {
        module: weighted_sum(deltas, ws, name=module, sources=paths, accumulate_dtype=dtype, out_dtype=dtype)
        for module, (deltas, ws, paths) in terms.items()
    }
