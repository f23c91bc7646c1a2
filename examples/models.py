"""One Llama builder for the examples, the benchmarks and the test helpers: named sizes, built locally.

Nothing is downloaded and pmakit is not imported (torch and transformers only), so any of them can use it:
``from examples.models import tiny_llama`` from the repository root.
"""

from __future__ import annotations

import contextlib

import torch


__all__ = ["SIZES", "llama_config", "tiny_llama"]

SIZES: dict[str, dict] = {
    # ~40k parameters: the unit tests' model (`tests.helpers.models`, vocabulary 64).
    "tiny": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 64,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
    },
    # ~110M parameters (GPT-2 small's width and depth): what the merge and export benchmarks time.
    "110m": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
        "vocab_size": 32000,
    },
    # ~22M parameters, untied, largest tensor 8 MB: the sharded (FSDP2) export's model in tests and benchmarks.
    "22m": {
        "hidden_size": 512,
        "intermediate_size": 1024,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 4096,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
    },
}


def llama_config(size: str | None = "tiny", **overrides):
    """The `LlamaConfig` of a named size, or of ``overrides`` alone for ``size=None`` (tied embeddings unless
    the size or ``overrides`` say otherwise)."""
    from transformers import LlamaConfig

    return LlamaConfig(**{"tie_word_embeddings": True, **(SIZES[size] if size else {}), **overrides})


def tiny_llama(
    size: str | None = "tiny",
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    **overrides,
):
    """A randomly initialised `LlamaForCausalLM` of a named size, the same weights for the same ``seed``.

    ``overrides`` are `LlamaConfig` fields (``hidden_size=...``) that replace the size's; ``device`` builds the
    weights there directly (no copy from the CPU).
    """
    from transformers import LlamaForCausalLM

    config = llama_config(size, **overrides)
    torch.manual_seed(seed)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = LlamaForCausalLM(config)
    return model if dtype is None else model.to(dtype)
