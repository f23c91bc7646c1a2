"""The decay-vs-merge experiment (`examples/decay_merge.py`) in a tiny configuration, end to end."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM

from examples import bytelm, decay_merge, decay_report
from pmakit import ALGORITHMS


TINY = [
    "--max_steps", "40", "--warmup_steps", "10", "--windows", "10,20", "--pma_interleave_step", "5",
    "--max_corpus_bytes", "60000", "--hidden_size", "32", "--num_layers", "1", "--intermediate_size", "64",
    "--num_heads", "2", "--logging_steps", "1000", "--use_cpu", "--per_device_eval_batch_size", "8",
]  # fmt: skip


def _cosine_weights(n: int) -> list[float]:
    """WSM weights of the cosine decay, written out independently of pmakit."""
    d = [(1 + math.cos(math.pi * i / n)) / 2 for i in range(n + 1)]
    return [d[i - 1] - d[i] for i in range(1, n + 1)]


def _bema(params: list[torch.Tensor], steps: list[int]) -> torch.Tensor:
    """TRL's BEMACallback at its defaults, as TRL runs it: theta_0 the first sample, the EMA from theta_0, each
    later sample folded with beta = (10 + step)^-0.5; the output is EMA + (10 + last step)^-0.2 (x_n - theta_0)."""
    theta0 = ema = params[0]
    for x, step in zip(params[1:], steps[1:], strict=True):
        beta = (10 + step) ** -0.5
        ema = (1 - beta) * ema + beta * x
    return ema + (10 + steps[-1]) ** -0.2 * (params[-1] - theta0)


def _halflife(params: list[torch.Tensor], steps: list[int], h: float) -> torch.Tensor:
    """torchtitan's half-life EMA from the first sample: decay 2^(-gap / (h step)) between samples."""
    ema = params[0]
    for x, prev, step in zip(params[1:], steps[:-1], steps[1:], strict=True):
        keep = 2 ** (-(step - prev) / (h * step))
        ema = keep * ema + (1 - keep) * x
    return ema


def _score_merge(folders, combine, val) -> float:
    """The validation loss of ``combine(tensors of each sample)`` per parameter, computed in fp64."""
    models = [AutoModelForCausalLM.from_pretrained(f) for f in folders]
    merged = AutoModelForCausalLM.from_pretrained(folders[-1])
    with torch.no_grad():
        for name, param in merged.named_parameters():
            param.copy_(combine([dict(m.named_parameters())[name].double() for m in models]).float())
    return bytelm.validation_loss(merged, val)


def _run(argv: list[str]) -> dict:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # a tiny model on a shared machine: more threads only add contention
        return decay_merge.main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif("decay" not in ALGORITHMS, reason="needs the decay rule and the sample store")
def test_decay_merge_tiny(tmp_path):
    out = tmp_path / "run"
    argv = [*TINY, "--output_dir", str(out), "--report_md", str(tmp_path / "r.md"), "--plot", str(tmp_path / "p.png")]
    summary = _run(argv)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(summary["decays"]) == {f"{s}@{w}" for s in ("linear", "cosine", "1-sqrt") for w in (10, 20)}
    assert set(summary["merges"]) == {f"{r}@{w}" for r in decay_merge.MERGE_RULES for w in (10, 20)}
    # the samples of the last 20 steps were kept, and the fork checkpoints at T - L
    assert sorted(p.name for p in (out / "pma-samples").iterdir()) == [f"step-{s}" for s in (25, 30, 35, 40)]
    assert (out / "checkpoint-30" / "optimizer.pt").is_file() and (out / "checkpoint-20").is_dir()

    # independent scores of merges of the last 4 samples (steps 25-40): fp64 closed forms, same validation bytes;
    # BEMA and the half-life EMA read the samples' optimizer steps, as TRL and torchtitan read the global step
    data = bytelm.load_corpus("topics", 60000)
    val = bytelm.ByteBlocks(bytelm.split_corpus(data, 0.1)[1], 128).truncate(8)
    steps = [25, 30, 35, 40]
    folders = [out / "pma-samples" / f"step-{s}" for s in steps]
    combines = {
        "decay:cosine": lambda ps: sum(w * p for w, p in zip(_cosine_weights(4), ps, strict=True)),
        "bema": lambda ps: _bema(ps, steps),
        "ema_halflife:0.05": lambda ps: _halflife(ps, steps, 0.05),
    }
    for rule, combine in combines.items():
        assert math.isclose(summary["merges"][f"{rule}@20"], _score_merge(folders, combine, val), rel_tol=1e-5)
    assert summary["live"] == bytelm.validation_loss(AutoModelForCausalLM.from_pretrained(folders[-1]), val)

    # the report's shares are (live - merge) / (live - decay), or n/a where the decay did not gain
    report = (tmp_path / "r.md").read_text()
    live = summary["live"]
    for rule in decay_merge.MERGE_RULES:
        gain = live - summary["decays"]["linear@20"]
        cell = f"{(live - summary['merges'][f'{rule}@20']) / gain:.0%}" if gain > 0 else "n/a"
        assert f"| 20 | {rule} | {'**' + cell + '**' if rule == 'sma' else cell} |" in report
    assert len({summary["decays"][f"{s}@20"] for s in ("linear", "cosine", "1-sqrt")}) == 3  # the shapes differ


@pytest.mark.skipif("decay" not in ALGORITHMS, reason="needs the decay rule and the sample store")
def test_decay_merge_seeds_and_reuse(tmp_path, monkeypatch):
    """Two seeds in seed-N folders, mean ± std over them; a rerun reuses every saved stage, merging only new specs."""
    out = tmp_path / "run"
    argv = [*TINY, "--windows", "20", "--decay_shapes", "linear", "--output_dir", str(out), "--seeds", "3,4"]
    summary = _run([*argv, "--alpha_grid", "ema:0.1,0.5"])
    per_seed = summary["per_seed"]
    assert summary["seeds"] == [3, 4] and sorted(per_seed) == ["3", "4"]
    assert all((out / f"seed-{s}" / "pma-samples" / "step-40").is_dir() for s in (3, 4))
    assert per_seed["3"]["live"] != per_seed["4"]["live"]  # another initialisation and data order
    assert set(summary["merges"]) == {f"{r}@20" for r in [*decay_merge.MERGE_RULES, "ema:0.1", "ema:0.5"]}
    for kind in ("merges", "decays"):
        for key, mean in summary[kind].items():
            values = [per_seed[s][kind][key] for s in ("3", "4")]
            assert (mean, summary["std"][kind][key]) == (statistics.fmean(values), statistics.stdev(values))
    report = (out / "results.md").read_text()
    live = [per_seed[s]["live"] for s in ("3", "4")]
    assert f"| live, constant LR (step T) | {statistics.fmean(live):.4f} ± {statistics.stdev(live):.4f} |" in report
    assert "## Alpha grid" in report and "| merge ema:0.5 |" in report and "\n| ema:0.1 | " in report
    assert json.loads((out / "results.json").read_text())["per_seed"] == per_seed

    # the rerun trains nothing and merges only the spec no seed has scored yet
    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    merged, run_merges = [], decay_merge.run_merges

    def spy(run, windows, interleave, alpha, val_ds, evaluate, rules):
        merged.append(list(rules))
        return run_merges(run, windows, interleave, alpha, val_ds, evaluate, rules)

    monkeypatch.setattr(decay_merge, "constant_run", refuse)
    monkeypatch.setattr(decay_merge, "decay_fork", refuse)
    monkeypatch.setattr(decay_merge, "run_merges", spy)
    again = _run([*argv, "--alpha_grid", "ema:0.5,0.3"])
    assert merged == [["ema:0.3"], ["ema:0.3"]]
    assert {k: v for k, v in again["per_seed"]["4"]["merges"].items() if k != "ema:0.3@20"} == per_seed["4"]["merges"]
    assert again["per_seed"]["3"]["decays"] == per_seed["3"]["decays"]
    with pytest.raises(ValueError, match="other settings"):  # saved results of another run are never mixed in
        _run([*argv, "--learning_rate", "1e-2"])


def test_report_cells_and_winners():
    """Shares and paired differences per seed, then mean ± sample std; n/a where a decay did not gain."""
    runs = [
        {"live": 1.0, "decays": {"linear@50": 0.8}, "merges": {"sma@50": 0.85, "ema@50": 0.9}},
        {"live": 1.2, "decays": {"linear@50": 0.9}, "merges": {"sma@50": 0.95, "ema@50": 0.94}},
    ]
    text = decay_report.tables(runs, [50], 10, ("linear",), ["sma", "ema"])
    sma = [(1.0 - 0.85) / 0.2, (1.2 - 0.95) / 0.3]
    assert f"| 50 | sma | **{statistics.fmean(sma):.0%} ± {statistics.stdev(sma):.0%}** |" in text
    assert f"| merge ema | {statistics.fmean([0.9, 0.94]):.4f} ± {statistics.stdev([0.9, 0.94]):.4f} |" in text
    found = decay_report.winners(runs, [50], ("linear",), ["sma", "ema"])[50]
    assert (found["best"], found["best_in_seeds"], found["runner_up"]) == ("sma", 1, "ema")  # 0.90 < 0.92 mean
    assert found["lead"] == pytest.approx([0.05, -0.01]) and found["merge_minus_decay"] == pytest.approx([0.05, 0.05])
    assert "| 50 | sma | 1 of 2 | ema | +0.0200 ± 0.0424 | linear | +0.0500 ± 0.0000 |" in (
        decay_report.winners_table(runs, {50: found})
    )
    gaps = decay_report.gap_table(runs, [50], ("linear",), ["sma", "ema"])  # against sma, the best by mean
    assert "| merge ema | +0.0200 ± 0.0424 |" in gaps and "| decay linear | -0.0500 ± 0.0000 |" in gaps
    runs[1]["decays"]["linear@50"] = 1.3  # no gain in one seed: no share
    assert "| 50 | sma | **n/a** |" in decay_report.share_table(runs, [50], ("linear",), ["sma"])


def test_rule_lists():
    assert decay_merge.grid_specs(["ema:0.1,0.5", "bema", "ema_halflife:0.25"]) == [
        "ema:0.1", "ema:0.5", "bema", "ema_halflife:0.25"
    ]  # fmt: skip
    args, ex, _ = decay_merge.parse_args(["--alpha_grid", "ema:0.2", "ema:0.3", "--merge_rules", "sma", "ema:0.2"])
    assert decay_merge.scored_rules(ex) == ["sma", "ema:0.2", "ema:0.3"] and decay_merge.seed_list(args, ex) == [0]
    with pytest.raises(ValueError, match="Unknown sweep rule 'emma'"):
        decay_merge.parse_args(["--merge_rules", "sma", "emma"])
    with pytest.raises(ValueError, match="--seeds"):
        decay_merge.parse_args(["--seeds", "0,0"])
