"""`sweep` itself (`pmakit.tools.sweep.run`): candidate merges of a real tiny run's checkpoints, scored, saved and
pushed, from Python and from `pmakit sweep`; an alpha grid gives one row per alpha, each the merge with that alpha."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from pmakit import ALGORITHMS, HubTarget, InputError, merge
from pmakit.cli import main
from pmakit.tools.sweep import parse_rule, sweep, sweep_inputs, text_loss_scorer
from tests.helpers.folders import read_folder, reference
from tests.tools.sweep.references import direct_loss, ema_weights


RULES = ["sma", "ema", "wma"]
WINDOWS = [2, 4]
ALPHAS = [0.05, 0.1, 0.2, 0.5]


def _fp64_sum(tensors) -> float:
    return math.fsum(float(t.double().sum()) for t in tensors.values())


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
        assert math.isclose(row.score, direct_loss(direct, held_out, 32), rel_tol=1e-5)
        if row is result.best:
            best, ref = read_folder(result.best_folder), read_folder(direct)
            assert best.keys() == ref.keys() and all(torch.equal(best[k], ref[k]) for k in ref)
    assert len({r.score for r in result.rows}) == len(result.rows)  # the rules and windows really differ


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
        assert math.isclose(row.score, direct_loss(direct, held_out, 32), rel_tol=1e-5)
    assert len({r.score for r in result.rows}) == 3
    with pytest.raises(InputError, match="decay shape must be one of linear, cosine, 1-sqrt"):
        parse_rule("decay:exp")


def test_an_alpha_grid_gives_one_row_per_alpha_each_the_merge_with_that_alpha(run_dir, tmp_path):
    merged = []

    def score(folder):  # the merge itself is kept; its score is the fp64 sum of every weight
        merged.append(read_folder(folder))
        return _fp64_sum(merged[-1])

    out = tmp_path / "sweep"
    result = sweep(run_dir, ["ema"], [4], score=score, alphas=ALPHAS, output_dir=out, metric="sum")
    assert [(r.rule, r.rule_name, r.params, r.window) for r in result.rows] == [
        (f"ema:{a}", "ema", {"alpha": a}, 4) for a in ALPHAS
    ]
    window = sweep_inputs(run_dir)[-4:]
    for row, tensors, alpha in zip(result.rows, merged, ALPHAS, strict=True):
        expected = reference(window, ema_weights(4, alpha))  # the fp64 closed form
        assert math.isclose(row.score, _fp64_sum(expected), rel_tol=1e-6)
        assert all(torch.allclose(tensors[k].double(), v, rtol=1e-6, atol=1e-7) for k, v in expected.items())
        merge(window, tmp_path / f"direct-{alpha}", algo="ema", alpha=alpha, progress=False)
        direct = read_folder(tmp_path / f"direct-{alpha}")
        assert direct.keys() == tensors.keys() and all(torch.equal(tensors[k], v) for k, v in direct.items())
    assert len({r.score for r in result.rows}) == len(ALPHAS)  # the alphas really differ

    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["rule"], r["rule_name"], r["params"], float(r["sum"])) for r in rows] == [
        (f"ema:{a}", "ema", f"alpha={a}", row.score) for a, row in zip(ALPHAS, result.rows, strict=True)
    ]
    card = (out / "best" / "README.md").read_text()
    assert all(f"| ema:{a} | 4 | 6-12 | alpha={a} | " in card for a in ALPHAS)
    best_alpha = result.best.params["alpha"]
    assert f"rule `ema:{best_alpha}` (alpha={best_alpha}) over the newest 4 inputs" in card
    best = read_folder(result.best_folder)
    assert all(torch.equal(best[k], v) for k, v in merged[ALPHAS.index(best_alpha)].items())


def test_cli_alpha_grid_prints_and_writes_each_alpha(run_dir, held_out, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["sweep", str(run_dir), "--rules", "sma", "ema", "--alphas", "0.1,0.5", "--windows", "3"]
    assert main([*argv, "--text", str(held_out), "--max-length", "32", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| sma | 3 | 8-12 |  | " in printed
    assert "| ema:0.1 | 3 | 8-12 | alpha=0.1 | " in printed and "| ema:0.5 | 3 | 8-12 | alpha=0.5 | " in printed
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["rule"], r["params"]) for r in rows] == [
        ("sma", ""),
        ("ema:0.1", "alpha=0.1"),
        ("ema:0.5", "alpha=0.5"),
    ]
    best = min(rows, key=lambda r: float(r["loss per token (nats)"]))
    assert f"best: {best['rule']}{' (' + best['params'] + ')' if best['params'] else ''} over 3 inputs" in printed

    with pytest.raises(SystemExit) as parsed:  # argparse refuses the pair, exit code 2
        main([*argv, "--alpha", "0.3", "--text", str(held_out), "-o", str(tmp_path / "both")])
    assert parsed.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    code = main(
        ["sweep", str(run_dir), "--rules", "ema", "--alphas", "0.1,1", "--windows", "2", "--text", "x", "-o", "y"]
    )
    assert code == 2 and "Rule 'ema:1.0'" in capsys.readouterr().err
    code = main(
        ["sweep", str(run_dir), "--rules", "ema_corrected:alpha=2", "--windows", "2", "--text", "x", "-o", "y"]
    )
    assert code == 2 and "Rule 'ema_corrected:alpha=2'" in capsys.readouterr().err  # the spec as written, no flag
