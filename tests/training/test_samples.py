"""Decay-shaped and bias-corrected online PMA in a real `PmaTrainer`, and the sample store."""

import math

import pytest
import torch

import pmakit
from pmakit import PmaArguments, PmaConfig, PmaTrainer
from pmakit.cli import main as cli_main
from pmakit.training.samples import stored_samples
from tests.helpers.models import TokenDataset, tiny_llama
from tests.helpers.training import SnapshotCallback, load_folder, pma_args, weighted


def train(tmp_path, **overrides):
    snap = SnapshotCallback()
    trainer = PmaTrainer(
        model=tiny_llama(), args=pma_args(tmp_path, **overrides), train_dataset=TokenDataset(), callbacks=[snap]
    )
    trainer.train()
    return trainer, snap


# fp64 closed forms written out by hand for 3 samples (independent of pmakit.averaging)
COSINE_3 = [0.25, 0.5, 0.25]  # d(x) = (1 + cos(pi x))/2 at 0, 1/3, 2/3, 1 is 1, 3/4, 1/4, 0
CORRECTED_3 = [a / (1 - 0.7**3) for a in (0.3 * 0.7**2, 0.3 * 0.7, 0.3)]  # alpha = 0.3


@pytest.mark.parametrize(
    "settings, weights",
    [
        ({"pma_fused_algo": "decay", "pma_decay_shape": "cosine"}, COSINE_3),
        ({"pma_fused_algo": "ema_corrected", "pma_ema_alpha": 0.3}, CORRECTED_3),
    ],
    ids=["cosine", "ema_corrected"],
)
def test_pma_folders_hold_the_closed_form(tmp_path, settings, weights):
    assert math.fsum(weights) == pytest.approx(1.0)
    _, snap = train(tmp_path, **settings)
    for step, steps in ((6, [2, 4, 6]), (12, [8, 10, 12])):
        saved = load_folder(tmp_path / f"pma-{step}")
        for name, ref in weighted(snap.snapshots, steps, weights).items():
            torch.testing.assert_close(saved[name].double(), ref, rtol=2e-6, atol=2e-6)
    card = (tmp_path / "pma-12" / "README.md").read_text()
    assert ("decay_shape: " + settings.get("pma_decay_shape", "")) in card or "ema_alpha: 0.3" in card


def test_sample_store_keeps_each_sample_and_merges_offline_like_online(tmp_path):
    run = tmp_path / "run"
    _, snap = train(run, pma_fused_algo="ema_corrected", pma_ema_alpha=0.3, pma_sample_store=True)
    folders = stored_samples(run)
    assert [f.name for f in folders] == [f"step-{t}" for t in (2, 4, 6, 8, 10, 12)]
    for folder, step in zip(folders, (2, 4, 6, 8, 10, 12), strict=True):
        assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("tokenizer")) == [
            "config.json",
            "generation_config.json",
            "model.safetensors",
        ]  # model only: no optimizer, scheduler or trainer state
        saved = load_folder(folder)
        assert all(torch.equal(saved[n].double(), ref) for n, ref in snap.snapshots[step].items())  # bitwise
    # the same rule offline over the last cycle's samples gives the online merge, to fp32 rounding
    pmakit.merge([str(f) for f in folders[3:]], tmp_path / "offline", algo="ema_corrected", alpha=0.3)
    offline, online = load_folder(tmp_path / "offline"), load_folder(run / "pma-12")
    assert offline.keys() == online.keys()
    for name in online:
        torch.testing.assert_close(offline[name], online[name], rtol=1e-6, atol=1e-6)
    # and any other rule or window after the fact, e.g. a cosine-decay merge of all six samples,
    # from Python and from the command line
    cosine_6 = [(math.cos(math.pi * (i - 1) / 6) - math.cos(math.pi * i / 6)) / 2 for i in range(1, 7)]
    expected = weighted(snap.snapshots, [2, 4, 6, 8, 10, 12], cosine_6)
    pmakit.merge([str(f) for f in folders], tmp_path / "cosine6", algo="decay", decay_shape="cosine")
    argv = ["average", *map(str, folders), "-o", str(tmp_path / "cli"), "--algo", "decay", "--decay-shape", "cosine"]
    assert cli_main(argv) == 0
    for out in ("cosine6", "cli"):
        for name, tensor in load_folder(tmp_path / out).items():
            torch.testing.assert_close(tensor.double(), expected[name], rtol=2e-6, atol=2e-6)


def test_sample_store_limit_removes_the_oldest(tmp_path):
    trainer, snap = train(tmp_path, pma_sample_store=True, pma_sample_store_limit=2, pma_write_back=True)
    assert [f.name for f in stored_samples(tmp_path)] == ["step-10", "step-12"]
    # the cycle-end sample is stored before the write-back replaces the live weights by the merge
    last, merged = load_folder(tmp_path / "pma-samples" / "step-12"), load_folder(tmp_path / "pma-12")
    assert all(torch.equal(merged[n].double(), ref) for n, ref in snap.snapshots[12].items())  # written back
    assert not any(torch.equal(last[n], merged[n]) for n in merged)
    step10 = load_folder(tmp_path / "pma-samples" / "step-10")
    assert all(torch.equal(step10[n].double(), ref) for n, ref in snap.snapshots[10].items())
    assert not any(p.name.startswith("_") for p in (tmp_path / "pma-samples").iterdir())  # no temporary left
    assert trainer.pma_engine.num_cycles == 2


def test_sample_store_is_off_by_default(tmp_path):
    train(tmp_path, max_steps=6)
    assert not (tmp_path / "pma-samples").exists()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"fused_algo": "decay"}, "`pma_fused_algo`='decay' needs `pma_decay_shape`: one of linear, cosine, 1-sqrt"),
        ({"fused_algo": "decay", "decay_shape": "exp"}, "`pma_decay_shape`: Unknown `decay_shape` 'exp'"),
        ({"fused_algo": "sma", "decay_shape": "cosine"}, "`pma_decay_shape` is only used with"),
        ({"fused_algo": "ema_corrected", "ema_alpha": 1.5}, r"`pma_ema_alpha` must lie in the open interval"),
        ({"sample_store_limit": 0}, "`pma_sample_store_limit` must be a positive integer or None"),
    ],
)
def test_arguments_are_validated_at_construction(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        PmaArguments(output_dir=str(tmp_path), **{f"pma_{k}": v for k, v in settings.items()})
    with pytest.raises(ValueError, match=message.replace("pma_", "")):
        PmaConfig(**settings)


def test_config_takes_a_callable_shape_and_checks_its_running_form():
    config = PmaConfig(fused_algo="decay", decay_shape=lambda x: (1 - x) ** 2, fused_num=4)
    assert config.rule.weights_for(4) == pytest.approx([7 / 16, 5 / 16, 3 / 16, 1 / 16])
    with pytest.raises(ValueError, match="`decay_shape`: The decay shape stays at 1"):
        PmaConfig(fused_algo="decay", decay_shape=lambda x: 1.0 if x < 0.5 else 2 - 2 * x, fused_num=4)


@pytest.mark.parametrize(
    "disable_tqdm, export", [(True, "sync"), (True, "async"), (False, "sync")], ids=["quiet", "quiet-async", "bars"]
)
def test_sample_store_and_exports_draw_bars_only_when_the_trainer_does(tmp_path, capfd, disable_tqdm, export):
    capfd.readouterr()
    train(tmp_path, max_steps=6, pma_sample_store=True, pma_export=export, disable_tqdm=disable_tqdm)
    err = capfd.readouterr().err
    assert len(stored_samples(tmp_path)) == 3 and (tmp_path / "pma-6").is_dir() and (tmp_path / "pma").is_dir()
    if disable_tqdm:
        assert "Writing model shards" not in err and "%|" not in err, err[-2000:]
    else:  # as transformers does: one bar per `save_pretrained` (3 samples, then the pma-6 export)
        assert err.count("Writing model shards: 100%") == 4, err[-2000:]


def test_optimizer_route_exports_follow_the_trainer_arguments_disable_tqdm(tmp_path, capfd):
    from transformers import Trainer

    from pmakit import create_pma_optimizer
    from tests.helpers.training import plain_args

    model, args = tiny_llama(), plain_args(tmp_path)  # disable_tqdm=True
    optimizers = create_pma_optimizer(model, {"interleave_step": 2, "fused_num": 3}, args=args)
    capfd.readouterr()
    Trainer(model=model, args=args, train_dataset=TokenDataset(), optimizers=optimizers).train()
    assert (tmp_path / "pma-6" / "model.safetensors").is_file()
    assert "Writing model shards" not in capfd.readouterr().err
