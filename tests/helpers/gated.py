"""A tiny Llama whose extra parameters get gradients only on some steps (issue 17, item 4).

Models with conditionally used parameters (MoE experts, adapters switched on late, heads used by some
losses only) leave the optimizer without state for a parameter until its first gradient. With PMA
sampling at steps 2, 4, 6, ... (``interleave_step=2``):

- ``late_head`` is first used at step 5, after two samples;
- ``sometimes_bias`` is used at steps 3, 6, 9, ... only (first gradient after the sample at step 2);
- ``frozen_bias`` never trains (``requires_grad=False``).
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM, TrainerCallback
from transformers.modeling_outputs import CausalLMOutputWithPast

from tests.helpers.models import tiny_llama


LATE_FROM = 5
SOMETIMES_EVERY = 3
CONDITIONAL = ("late_head.weight", "sometimes_bias")


class GatedLlama(LlamaForCausalLM):
    """`LlamaForCausalLM` with a late head, a bias used on some steps, a frozen bias; ``current_step`` gates them."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.late_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.sometimes_bias = torch.nn.Parameter(torch.zeros(config.vocab_size))
        self.frozen_bias = torch.nn.Parameter(torch.linspace(-0.1, 0.1, config.vocab_size), requires_grad=False)
        self.current_step = 1

    def forward(self, input_ids=None, labels=None, **kwargs):
        hidden = self.model(input_ids=input_ids).last_hidden_state
        logits = self.lm_head(hidden) + self.frozen_bias
        if self.current_step >= LATE_FROM:
            logits = logits + self.late_head(hidden)
        if self.current_step % SOMETIMES_EVERY == 0:
            logits = logits + self.sometimes_bias
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def gated_llama(seed: int = 0) -> GatedLlama:
    """A `GatedLlama` with the weights of ``tiny_llama(seed)`` and seeded extra parameters."""
    base = tiny_llama(seed)
    torch.manual_seed(seed + 1)
    model = GatedLlama(base.config)
    model.load_state_dict(base.state_dict(), strict=False)
    return model


class StepGate(TrainerCallback):
    """Tell the model which optimizer step it is computing (resumes with the Trainer's ``global_step``)."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        model.current_step = state.global_step + 1
