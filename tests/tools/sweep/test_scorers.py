"""The sweep's scorers (`pmakit.tools.sweep.scorers`): a Trainer's `evaluate` and the causal-LM loss on a held-out
text, each equal to its reference on the same merged folder."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM, Trainer

from pmakit import merge
from pmakit.tools.sweep import sweep, sweep_inputs, text_loss_scorer, trainer_scorer
from tests.helpers.models import TokenDataset, tiny_llama
from tests.helpers.training import plain_args
from tests.tools.sweep.references import direct_loss


def test_trainer_scorer_matches_evaluate_and_restores_weights(run_dir, tmp_path):
    eval_ds = TokenDataset(n=16, seed=5)
    model = tiny_llama(seed=3)
    trainer = Trainer(model=model, args=plain_args(tmp_path / "eval"), eval_dataset=eval_ds)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = sweep(run_dir, ["sma"], [3], score=trainer_scorer(trainer), metric="eval_loss")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    direct = tmp_path / "direct"
    merge(sweep_inputs(run_dir)[-3:], direct)
    reference = Trainer(
        model=AutoModelForCausalLM.from_pretrained(direct), args=plain_args(tmp_path / "ref"), eval_dataset=eval_ds
    ).evaluate()["eval_loss"]
    assert math.isclose(result.rows[0].score, reference, rel_tol=1e-6)


def test_text_loss_scorer_is_the_labelled_loss_of_hf(run_dir, held_out):
    folder = sweep_inputs(run_dir)[-1]
    for max_length in (8, 32):
        scorer = text_loss_scorer(held_out, batch_size=3, max_length=max_length)
        assert math.isclose(scorer(folder), direct_loss(folder, held_out, max_length), rel_tol=1e-6)
