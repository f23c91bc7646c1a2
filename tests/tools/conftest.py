"""Fixtures shared by the sweep tests: a real tiny Trainer run and a held-out text in its vocabulary."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer

from tests.helpers.folders import make_tokenizer
from tests.helpers.models import VOCAB, TokenDataset, tiny_llama
from tests.helpers.training import plain_args


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real Trainer run of a tiny Llama that saved 6 model-only checkpoints (with its tokenizer)."""
    root = tmp_path_factory.mktemp("run")
    args = plain_args(
        root, max_steps=12, save_strategy="steps", save_steps=2, save_only_model=True, learning_rate=3e-2
    )
    Trainer(model=tiny_llama(), args=args, train_dataset=TokenDataset(), processing_class=make_tokenizer()).train()
    return root


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    generator = torch.Generator().manual_seed(7)
    words = torch.randint(1, VOCAB - 1, (150,), generator=generator).tolist()
    path = tmp_path_factory.mktemp("text") / "held_out.txt"
    path.write_text(" ".join(f"t{i}" for i in words), encoding="utf-8")
    return path
