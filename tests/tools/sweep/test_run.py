"""`pmakit sweep`: candidate merges of a real tiny run's checkpoints, scored, tabulated, saved and pushed."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer

from pmakit import ALGORITHMS, HubTarget, InputError, merge
from pmakit.cli import main
from pmakit.tools.sweep import parse_rule, sweep, sweep_inputs, text_loss_scorer, trainer_scorer
from tests.helpers.folders import make_tokenizer, read_folder
from tests.helpers.models import TokenDataset, tiny_llama
from tests.helpers.training import plain_args


RULES = ["sma", "ema", "wma"]
WINDOWS = [2, 4]


def _direct_loss(folder, text_path, max_length: int) -> float:
    """The reference: HF's own labelled loss per block, weighted by the block's predicted tokens."""
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


def test_sweep_inputs_from_run_folder(run_dir):
    folders = sweep_inputs(run_dir)
    assert [f.name for f in folders] == [f"checkpoint-{s}" for s in (2, 4, 6, 8, 10, 12)]
    with pytest.raises(InputError, match="pma-samples/step-N"):
        sweep_inputs(run_dir, source="samples")


def test_sweep_best_is_the_direct_merge_bitwise_and_scores_match(run_dir, held_out, tmp_path):
    scorer = text_loss_scorer(held_out, batch_size=3, max_length=32)
    result = sweep(run_dir, RULES, WINDOWS, score=scorer, output_dir=tmp_path / "sweep", metric="loss")
    assert [(r.rule, r.window) for r in result.rows] == [(r, w) for r in RULES for w in WINDOWS]
    assert result.best.score == min(r.score for r in result.rows)
    assert (result.rows[0].first_step, result.rows[0].last_step) == (10, 12)

    folders = sweep_inputs(run_dir)
    for row in result.rows:
        direct = tmp_path / f"direct-{row.rule}-{row.window}"
        merge(folders[-row.window :], direct, algo=row.rule)
        assert math.isclose(row.score, _direct_loss(direct, held_out, 32), rel_tol=1e-5)
        if row is result.best:
            best, ref = read_folder(result.best_folder), read_folder(direct)
            assert best.keys() == ref.keys() and all(torch.equal(best[k], ref[k]) for k in ref)
    assert len({r.score for r in result.rows}) == len(result.rows)  # the rules and windows really differ


def test_sweep_writes_table_csv_plot_and_card(run_dir, tmp_path):
    calls = []

    def score(folder):
        calls.append(folder)
        return float(read_folder(folder)["model.norm.weight"].double().sum())

    out = tmp_path / "sweep"
    result = sweep(
        run_dir, ["sma", "wma"], [1, 3], score=score, output_dir=out, metric="norm sum", greater_is_better=True
    )
    assert len(calls) == 4 and result.best.score == max(r.score for r in result.rows)
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["rule"], int(r["window"]), float(r["norm sum"])) for r in rows] == [
        (r.rule, r.window, r.score) for r in result.rows
    ]
    md = (out / "sweep.md").read_text()
    assert md.count("\n") == 2 + 4 and "| norm sum | best |" in md
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and result.plot == out / "sweep.png"
    card = (out / "best" / "README.md").read_text()
    assert "## Sweep" in card and all(f"{r.score:.6g}" in card for r in result.rows)
    assert (out / "best" / "sweep.csv").read_text() == (out / "sweep.csv").read_text()
    assert not list(out.glob(".*")), "no temporary folder is left behind"
    with pytest.raises(InputError, match="already exists"):
        sweep(run_dir, ["sma"], [1], score=score, output_dir=out)


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


def test_bad_candidates_fail_before_any_merge(run_dir, tmp_path):
    def never(folder):
        raise AssertionError("no merge should be scored")

    with pytest.raises(InputError, match="Unknown sweep rule 'smaa'"):
        sweep(run_dir, ["sma", "smaa"], [2], score=never)
    with pytest.raises(InputError, match="Window 7 is longer than the 6 inputs"):
        sweep(run_dir, ["sma"], [2, 7], score=never)
    with pytest.raises(InputError, match="positive"):
        sweep(run_dir, ["sma"], [0], score=never)
    with pytest.raises(InputError, match="output_dir"):
        sweep(run_dir, ["sma"], [2], score=never, push_to_hub="alice/x")
    assert parse_rule("ema") == {"algo": "ema"}


def test_cli_sweep_and_bad_rule_exit_code(run_dir, held_out, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["sweep", str(run_dir), "--rules", "nope", "--windows", "2", "--text", str(held_out), "-o", str(out)])
    assert code == 2 and "Unknown sweep rule 'nope'" in capsys.readouterr().err and not out.exists()

    argv = ["sweep", str(run_dir), "--rules", "sma", "wma", "--windows", "2", "3", "--text", str(held_out)]
    code = main([*argv, "--max-length", "32", "--batch-size", "4", "--per", "byte", "-o", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "best:" in printed and (out / "sweep.csv").is_file() and (out / "best").is_dir()
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    scorer = text_loss_scorer(held_out, max_length=32, per="byte")
    direct = tmp_path / "direct"
    merge(sweep_inputs(run_dir)[-3:], direct, algo="wma")
    assert float(next(r for r in rows if r["rule"] == "wma" and r["window"] == "3")["loss per byte (nats)"]) == (
        scorer(direct)
    )


def test_sweep_pushes_best_with_its_card(run_dir, held_out, local_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", local_hub.write_token)
    result = sweep(
        run_dir,
        ["sma", "ema"],
        [2],
        score=text_loss_scorer(held_out, max_length=32),
        output_dir=tmp_path / "out",
        push_to_hub=HubTarget("alice/swept", private=True),
    )
    assert result.commit_url.startswith(f"{local_hub.endpoint}/alice/swept/commit/")
    remote = local_hub.files("alice/swept")
    local = {p.name: p.read_bytes() for p in result.best_folder.iterdir()}
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == local
    card = remote["README.md"].decode()
    assert "## Sweep" in card and all(f"| {r.rule} | 2 |" in card for r in result.rows)
    assert local_hub.repo("alice/swept").private


@pytest.mark.skipif("decay" not in ALGORITHMS, reason="needs the decay rule and the bias-corrected EMA")
def test_sweep_decay_and_corrected_ema_candidates(run_dir, held_out, tmp_path):
    rules = ["ema_corrected", "decay:cosine", "decay:1-sqrt"]
    result = sweep(run_dir, rules, [3], score=text_loss_scorer(held_out, max_length=32), alpha=0.3)
    folders = sweep_inputs(run_dir)[-3:]
    for row, kwargs in zip(
        result.rows,
        [dict(algo="ema_corrected", alpha=0.3), dict(algo="decay", decay_shape="cosine"),
         dict(algo="decay", decay_shape="1-sqrt")],
        strict=True,
    ):  # fmt: skip
        direct = tmp_path / row.rule.replace(":", "-")
        merge(folders, direct, **kwargs)
        assert math.isclose(row.score, _direct_loss(direct, held_out, 32), rel_tol=1e-5)
    assert len({r.score for r in result.rows}) == 3
    with pytest.raises(InputError, match="decay shape must be one of linear, cosine, 1-sqrt"):
        parse_rule("decay:exp")
