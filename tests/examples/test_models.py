"""`examples.models`: the one Llama builder of the examples, the benchmarks and the test helpers."""

from __future__ import annotations

import pytest
import torch

from examples.models import SIZES, llama_config, tiny_llama


def closed_form_params(size: dict, tied: bool) -> int:
    """Per layer q/o (2 d^2), k/v (2 d * kv * d/heads), SwiGLU (3 d i), two RMSNorms; embeddings; final norm."""
    d, i, heads = size["hidden_size"], size["intermediate_size"], size["num_attention_heads"]
    kv = size["num_key_value_heads"]
    per_layer = 2 * d * d + 2 * d * kv * (d // heads) + 3 * d * i + 2 * d
    embeddings = size["vocab_size"] * d * (1 if tied else 2)
    return size["num_hidden_layers"] * per_layer + embeddings + d


@pytest.mark.parametrize("name", sorted(SIZES))
def test_each_size_has_its_closed_form_parameter_count(name):
    model = tiny_llama(name, device="meta")  # shapes only: the 110M model allocates nothing
    tied = model.config.tie_word_embeddings
    assert tied == (name != "22m")
    assert sum(p.numel() for p in model.parameters()) == closed_form_params(SIZES[name], tied)


def test_same_seed_same_weights_and_overrides_replace_the_size():
    a, b, c = tiny_llama(seed=3), tiny_llama(seed=3), tiny_llama(seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    wide = tiny_llama(hidden_size=64, tie_word_embeddings=False, dtype=torch.bfloat16)
    assert wide.config.hidden_size == 64 and wide.lm_head.weight is not wide.model.embed_tokens.weight
    assert wide.dtype == torch.bfloat16 and wide.config.num_hidden_layers == SIZES["tiny"]["num_hidden_layers"]
    bare = llama_config(None, hidden_size=64, num_attention_heads=4)  # no size: LlamaConfig's own defaults
    assert bare.num_hidden_layers == llama_config(None).num_hidden_layers != SIZES["tiny"]["num_hidden_layers"]
