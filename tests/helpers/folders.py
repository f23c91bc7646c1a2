"""Helpers for the merger tests: tiny model folders written with `save_pretrained`, fp64 references."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.helpers.models import VOCAB, tiny_llama


def make_tokenizer():
    """A word-level fast tokenizer over the tiny vocabulary, built locally.

    Every id is one token: `<unk>` is id VOCAB-1 and no word shares it. (Sharing an id made reloading
    depend on hash order: sometimes `<unk>` became a new id VOCAB, outside the model's embedding.)
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB - 1)}
    vocab["<unk>"] = VOCAB - 1
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="t0")


def save_models(
    root: Path,
    n: int,
    *,
    dtype=torch.float32,
    tie: bool = True,
    seed0: int = 0,
    names=None,
    tokenizer: bool = False,
    **save_kwargs,
) -> list[Path]:
    """``n`` tiny Llamas with different weights, each saved as a model folder under ``root``."""
    folders = []
    for i in range(n):
        folder = Path(root) / (names[i] if names else f"m{i}")
        model = tiny_llama(seed=seed0 + i, dtype=dtype, tie=tie)
        model.save_pretrained(folder, **save_kwargs)
        if tokenizer:
            make_tokenizer().save_pretrained(folder)
        folders.append(folder)
    return folders


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def reference(folders, weights) -> dict[str, torch.Tensor]:
    """sum_i w_i x_i in fp64, oldest first (the independent reference)."""
    states = [read_folder(f) for f in folders]
    return {k: sum(w * s[k].double() for w, s in zip(weights, states, strict=True)) for k in states[0]}


def write_raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + data)
