"""Independent references for the sweep tests: HF's own labelled loss, and the fp64 closed form of EMA."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from tests.helpers.folders import make_tokenizer


def direct_loss(folder, text_path, max_length: int) -> float:
    """HF's own labelled loss per block of ``max_length`` tokens, weighted by the block's predicted tokens."""
    tokenizer = make_tokenizer()
    ids = tokenizer(text_path.read_text(), add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), max_length):
            block = torch.tensor([ids[start : start + max_length]])
            if block.shape[1] < 2:
                continue
            total += model(input_ids=block, labels=block).loss.item() * (block.shape[1] - 1)
            count += block.shape[1] - 1
    return total / count


def ema_weights(n: int, alpha: float) -> list[float]:
    """EMA started at the first sample, oldest first: ``(1-a)^(n-1)``, then ``a(1-a)^(n-i)`` (DESIGN's table)."""
    return [(1 - alpha) ** (n - 1)] + [alpha * (1 - alpha) ** (n - i) for i in range(2, n + 1)]
