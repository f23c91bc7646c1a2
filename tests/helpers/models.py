"""Tiny models and deterministic data built locally (nothing is downloaded)."""

from __future__ import annotations

import torch


VOCAB = 64
SEQ = 16


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, tie: bool = True):
    """A 2-layer Llama of ~40k parameters, built locally."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).to(dtype)


class TokenDataset(torch.utils.data.Dataset):
    """Fixed random token sequences (a deterministic stand-in for text in unit tests)."""

    def __init__(self, n: int = 64, seed: int = 1, seq: int = SEQ) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, seq), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}
