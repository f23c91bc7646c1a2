"""Tiny models and deterministic data built locally (nothing is downloaded)."""

from __future__ import annotations

import torch

from examples.models import SIZES
from examples.models import tiny_llama as build_llama


VOCAB = SIZES["tiny"]["vocab_size"]
SEQ = 16


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, tie: bool = True):
    """The shared builder's ``"tiny"`` size (2 layers, ~40k parameters), in the tests' call shape."""
    return build_llama("tiny", seed=seed, dtype=dtype, tie_word_embeddings=tie)


class TokenDataset(torch.utils.data.Dataset):
    """Fixed random token sequences (a deterministic stand-in for text in unit tests)."""

    def __init__(self, n: int = 64, seed: int = 1, seq: int = SEQ) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, seq), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}
