"""`PmaTrainer` end to end on a tiny Llama: layouts, numerics against fp64 references, resume."""

import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

from pmakit import PmaTrainer
from pmakit.averaging import AveragingRule
from pmakit.online.engine import AVG_KEY
from tests.helpers.models import TokenDataset, tiny_llama
from tests.helpers.training import SnapshotCallback, StopAt, load_folder, plain_args, pma_args, weighted


def train(tmp_path, model=None, callbacks=(), train_dataset=None, **overrides):
    model = model if model is not None else tiny_llama()
    trainer = PmaTrainer(
        model=model,
        args=pma_args(tmp_path, **overrides),
        train_dataset=train_dataset or TokenDataset(),
        eval_dataset=TokenDataset(16, seed=9),
        callbacks=list(callbacks),
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("algo", ["sma", "ema", "wma"])
def test_pma_folders_hold_the_closed_form_average(tmp_path, algo):
    snap = SnapshotCallback()
    trainer = train(tmp_path, callbacks=[snap], pma_fused_algo=algo, pma_ema_alpha=0.3)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("pma")) == ["pma", "pma-12", "pma-6"]
    weights = AveragingRule(algo, 0.3).weights_for(3)
    for step, steps in ((6, [2, 4, 6]), (12, [8, 10, 12])):
        saved = load_folder(tmp_path / f"pma-{step}")
        expected = weighted(snap.snapshots, steps, weights)
        assert "lm_head.weight" not in saved  # tied to the embeddings: written once
        for name, ref in expected.items():
            torch.testing.assert_close(saved[name].double(), ref, rtol=2e-6, atol=2e-6)
    latest, last_cycle = load_folder(tmp_path / "pma"), load_folder(tmp_path / "pma-12")
    assert latest.keys() == last_cycle.keys() and all(torch.equal(latest[k], last_cycle[k]) for k in latest)
    card = (tmp_path / "pma-12" / "README.md").read_text()
    assert "tags:" in card and "- pma" in card and "- merge" in card and "sample_steps:\n- 8\n- 10\n- 12" in card
    assert trainer.pma_engine.num_cycles == 2


def test_merged_folder_loads_and_generates(tmp_path):
    train(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pma")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_gradient_accumulation_counts_optimizer_steps_only(tmp_path):
    snap = SnapshotCallback()
    trainer = train(tmp_path, callbacks=[snap], gradient_accumulation_steps=3, per_device_train_batch_size=2)
    assert trainer.pma_engine.step == 12  # 36 micro-batches, 12 optimizer steps
    saved = load_folder(tmp_path / "pma-6")
    for name, ref in weighted(snap.snapshots, [2, 4, 6], [1 / 3] * 3).items():
        torch.testing.assert_close(saved[name].double(), ref, rtol=2e-6, atol=2e-6)


def test_bf16_model_keeps_fp32_average_and_exports_bf16(tmp_path):
    snap = SnapshotCallback()
    trainer = train(tmp_path, model=tiny_llama(dtype=torch.bfloat16), callbacks=[snap], max_steps=6)
    state = trainer.optimizer.optimizer.state if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer.state
    assert {entry[AVG_KEY].dtype for entry in state.values() if AVG_KEY in entry} == {torch.float32}
    saved = load_folder(tmp_path / "pma-6")
    averages = {n: trainer.pma_engine.averages()[p] for n, p in trainer.model.named_parameters()}
    for name, ref in weighted(snap.snapshots, [2, 4, 6], [1 / 3] * 3).items():
        # the fp32 average is the fp64 closed form to fp32 accuracy; the export is that average cast once
        torch.testing.assert_close(averages[name].double(), ref, rtol=1e-6, atol=1e-7)
        assert saved[name].dtype == torch.bfloat16
        assert torch.equal(saved[name], averages[name].to(torch.bfloat16))


def test_untied_embeddings_are_both_averaged(tmp_path):
    snap = SnapshotCallback()
    train(tmp_path, model=tiny_llama(tie=False), callbacks=[snap], max_steps=6)
    saved = load_folder(tmp_path / "pma-6")
    expected = weighted(snap.snapshots, [2, 4, 6], [1 / 3] * 3)
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        torch.testing.assert_close(saved[name].double(), expected[name], rtol=2e-6, atol=2e-6)


def test_write_back_continues_from_the_merge(tmp_path):
    snap = SnapshotCallback()
    run = tmp_path / "pma_run"
    train(run, callbacks=[snap], pma_write_back=True, save_strategy="steps", save_steps=6, max_steps=8)
    merged = load_folder(run / "pma-6")
    # Right after the cycle ends at step 6 the live weights are the exported merge, bit for bit.
    assert snap.snapshots[6].keys() == merged.keys()
    assert all(torch.equal(snap.snapshots[6][k], merged[k].double()) for k in merged)
    live = load_folder(run / "checkpoint-6")
    assert all(torch.equal(merged[k], live[k]) for k in merged)
    # The next steps start from them: a plain Trainer (no PMA) resumed from checkpoint-6, whose
    # weights are the merge and whose optimizer moments are the run's own, takes the same steps 7-8.
    resumed = SnapshotCallback()
    args = plain_args(tmp_path / "resumed", max_steps=8, data_seed=0, dataloader_num_workers=0)
    Trainer(model=tiny_llama(), args=args, train_dataset=TokenDataset(), callbacks=[resumed]).train(
        resume_from_checkpoint=str(run / "checkpoint-6")
    )
    for step in (7, 8):
        assert all(torch.equal(resumed.snapshots[step][k], snap.snapshots[step][k]) for k in merged), step


def test_eval_on_pma_weights(tmp_path):
    class SeenMetrics(TrainerCallback):  # a user callback (EarlyStoppingCallback reads metrics the same way)
        def __init__(self):
            self.keys = []

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.keys.append(sorted(metrics))

    seen = SeenMetrics()
    trainer = train(
        tmp_path, callbacks=[seen], pma_eval=True, eval_strategy="steps", eval_steps=6, per_device_eval_batch_size=8
    )
    main_evals = [keys for keys in seen.keys if "eval_loss" in keys]
    assert len(main_evals) == 2 and all("eval_pma_loss" in keys for keys in main_evals)
    history = [h for h in trainer.state.log_history if "eval_pma_loss" in h]
    assert [h["step"] for h in history] == [6, 12]
    assert all("eval_loss" in h for h in trainer.state.log_history if h.get("step") == 6 and "eval_runtime" in h)
    # at step 6 the average is exactly the merge written to pma-6: evaluate that folder independently
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pma-6").eval()
    data = TokenDataset(16, seed=9).ids
    with torch.no_grad():
        losses = [model(input_ids=data[i : i + 8], labels=data[i : i + 8]).loss for i in range(0, 16, 8)]
    assert history[0]["eval_pma_loss"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)


def test_save_total_limit_and_save_off(tmp_path):
    train(tmp_path / "a", max_steps=18, pma_save_total_limit=2)
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if p.name.startswith("pma")) == [
        "pma",
        "pma-12",
        "pma-18",
    ]
    train(tmp_path / "b", pma_save=False)
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.name.startswith("pma")) == ["pma"]
    assert (tmp_path / "b" / "pma" / "config.json").is_file()


def test_unfinished_cycle_writes_average_so_far_with_warning(tmp_path):
    snap = SnapshotCallback()
    with pytest.warns(UserWarning, match="no cycle completed"):
        train(tmp_path, callbacks=[snap], max_steps=4, pma_fused_num=5)
    saved = load_folder(tmp_path / "pma")
    for name, ref in weighted(snap.snapshots, [2, 4], [0.5, 0.5]).items():
        torch.testing.assert_close(saved[name].double(), ref, rtol=2e-6, atol=2e-6)


def test_start_step_skips_early_samples(tmp_path):
    trainer = train(tmp_path, pma_start_step=4, max_steps=10)
    assert trainer.pma_engine.counters["merged_steps"] == [6, 8, 10]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("pma-")) == ["pma-10"]


@pytest.mark.parametrize("write_back", [False, True], ids=["shadow", "write_back"])
@pytest.mark.parametrize("stop", [5, 6], ids=["mid_cycle", "cycle_boundary"])
def test_resume_is_bitwise_exact(tmp_path, write_back, stop):
    common = dict(pma_write_back=write_back, max_steps=14, pma_fused_algo="ema", pma_ema_alpha=0.3)
    train(tmp_path / "full", **common)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(tmp_path / "part", callbacks=[StopAt(stop)], save_strategy="steps", save_steps=stop, **common)
    resumed = PmaTrainer(
        model=tiny_llama(),
        args=pma_args(tmp_path / "part", **common),
        train_dataset=TokenDataset(),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / f"checkpoint-{stop}"))
    for folder in ("pma-12", "pma"):
        full, part = load_folder(tmp_path / "full" / folder), load_folder(tmp_path / "part" / folder)
        assert full.keys() == part.keys()
        for key in full:
            assert torch.equal(full[key], part[key]), f"{folder}/{key} differs after resume"
    assert resumed.pma_engine.counters == {
        "step": 14, "count": 1, "sample_steps": [14], "cycles": 2, "merged_steps": [8, 10, 12]
    }  # fmt: skip


class CaptureAverageAtStart(TrainerCallback):
    """Reads the engine right after the checkpoint was loaded, before any further step."""

    def __init__(self, trainer_ref):
        self.trainer_ref = trainer_ref
        self.averages = None

    def on_train_begin(self, args, state, control, **kwargs):
        engine = self.trainer_ref[0].pma_engine
        params = [p for g in engine.optimizer.param_groups for p in g["params"]]
        self.averages = [engine.optimizer.state[p][AVG_KEY].clone() for p in params]


def test_resume_keeps_fp32_average_for_bf16_model(tmp_path):
    args = dict(max_steps=8, save_strategy="steps", save_steps=5, pma_fused_num=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = train(tmp_path, model=tiny_llama(dtype=torch.bfloat16), callbacks=[StopAt(5)], **args)
    engine = first.pma_engine
    saved = [engine.optimizer.state[p][AVG_KEY].clone() for g in engine.optimizer.param_groups for p in g["params"]]
    ref = []
    capture = CaptureAverageAtStart(ref)
    resumed = PmaTrainer(
        model=tiny_llama(dtype=torch.bfloat16), args=pma_args(tmp_path, **args), train_dataset=TokenDataset(),
        callbacks=[capture],
    )  # fmt: skip
    ref.append(resumed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    assert len(capture.averages) == len(saved)
    for restored, original in zip(capture.averages, saved, strict=True):
        assert restored.dtype == torch.float32 and torch.equal(restored, original)


def test_horizon_warning_at_train_start(tmp_path):
    with pytest.warns(UserWarning, match="only 1 sample"):
        train(tmp_path, num_train_epochs=1, max_steps=-1, pma_interleave_step=10, train_dataset=TokenDataset(64))


def test_trainer_state_records_model_tags(tmp_path):
    trainer = train(tmp_path, max_steps=2)
    assert "pma" in trainer.model.model_tags
    assert json.loads((tmp_path / "pma" / "config.json").read_text())["model_type"] == "llama"
