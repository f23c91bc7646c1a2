"""The sweep's reports (`pmakit.tools.sweep.reports`): `sweep.md`, `sweep.csv`, `sweep.png` and the best model's
card; each row names its rule and every parameter the merge used (defaults and the sweep's alpha included)."""

from __future__ import annotations

import csv

import pytest

from pmakit import InputError
from pmakit.tools.sweep import SweepRow, sweep
from pmakit.tools.sweep.reports import csv_table, markdown_table
from tests.helpers.folders import read_folder, save_models


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

    assert list(rows[0]) == ["rule", "window", "first_step", "last_step", "norm sum", "rule_name", "params"]
    assert [(r["rule_name"], r["params"]) for r in rows] == [("sma", ""), ("sma", ""), ("wma", ""), ("wma", "")]


# What each spec resolves to: the rule, then every parameter in its declared order with the value merged.
RESOLVED = {
    "sma": ("sma", {}),
    "ema": ("ema", {"alpha": 0.3}),  # the sweep's alpha
    "ema:0.5": ("ema", {"alpha": 0.5}),  # the spec's own wins
    "ema_corrected": ("ema_corrected", {"alpha": 0.3}),
    "decay:cosine": ("decay", {"decay_shape": "cosine"}),
    "ema_halflife:0.25": ("ema_halflife", {"half_life_fraction": 0.25, "step_bias": 0.0}),
    "bema:lag=5": (
        "bema",
        {"ema_power": 0.5, "bias_power": 0.2, "lag": 5.0, "multiplier": 1.0, "min_ema_multiplier": 0.0},
    ),
}


def test_rows_carry_the_resolved_rule_and_every_parameter(tmp_path):
    folders = save_models(tmp_path, 3, names=["step-100", "step-200", "step-300"])
    result = sweep(folders, list(RESOLVED), [3], score=lambda f: 0.0, alpha=0.3, output_dir=tmp_path / "out")
    assert {r.rule: (r.rule_name, r.params) for r in result.rows} == RESOLVED
    assert all(list(r.params) == list(RESOLVED[r.rule][1]) for r in result.rows)  # the declared order
    bema = "ema_power=0.5;bias_power=0.2;lag=5.0;multiplier=1.0;min_ema_multiplier=0.0"
    rows = {r["rule"]: r for r in csv.DictReader((tmp_path / "out" / "sweep.csv").open())}
    assert rows["bema:lag=5"]["params"] == bema and rows["bema:lag=5"]["rule_name"] == "bema"
    assert rows["ema"]["params"] == "alpha=0.3" and rows["sma"]["params"] == ""
    md = (tmp_path / "out" / "sweep.md").read_text()
    assert "| ema_halflife:0.25 | 3 | 100-300 | half_life_fraction=0.25; step_bias=0.0 | 0 |" in md
    assert f"| bema:lag=5 | 3 | 100-300 | {bema.replace(';', '; ')} | 0 |" in md
    assert "rule `sma` over the newest 3 inputs" in (tmp_path / "out" / "best" / "README.md").read_text()

    default = sweep(folders, ["ema", "ema_corrected"], [2], score=lambda f: 0.0, save_best=False)
    assert [r.params for r in default.rows] == [{"alpha": 0.2}, {"alpha": 0.2}]  # the rule's default, shown


def test_tables_of_rows_built_by_hand():
    rows = [SweepRow("ema:0.1", 2, 4, 6, 0.5, "ema", {"alpha": 0.1}), SweepRow("decay:cosine", 2, None, None, 0.25)]
    assert rows[1].rule_name == "decay" and rows[1].params == {}  # older callers: the name from the spec
    assert csv_table(rows, "loss").splitlines() == [
        "rule,window,first_step,last_step,loss,rule_name,params",
        "ema:0.1,2,4,6,0.5,ema,alpha=0.1",
        "decay:cosine,2,,,0.25,decay,",
    ]
    assert markdown_table(rows, rows[1], "loss").splitlines()[2:] == [
        "| ema:0.1 | 2 | 4-6 | alpha=0.1 | 0.5 |  |",
        "| decay:cosine | 2 |  |  | 0.25 | yes |",
    ]
