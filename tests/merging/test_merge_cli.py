"""The `pmakit` command: average, merge (recipe), inspect, dry runs, exit codes and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from pmakit.cli import main
from tests.helpers.folders import read_folder, save_models


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    save_models(run, 4, names=[f"checkpoint-{s}" for s in (10, 20, 30, 40)])
    return run


def test_average_a_run(run_dir, tmp_path, capsys):
    assert (
        main(["average", str(run_dir), "--last", "2", "--algo", "sma", "-o", str(tmp_path / "out"), "--no-progress"])
        == 0
    )
    assert "merged 2 inputs" in capsys.readouterr().out
    recipe = yaml.safe_load((tmp_path / "out" / "pmakit_recipe.yaml").read_text())
    assert [m.rsplit("/", 1)[1] for m in recipe["models"]] == ["checkpoint-30", "checkpoint-40"]
    a, b, out = (
        read_folder(run_dir / "checkpoint-30"),
        read_folder(run_dir / "checkpoint-40"),
        read_folder(tmp_path / "out"),
    )
    assert all(((out[k] - (a[k] + b[k]) / 2).abs() <= 1e-6).all() for k in out)


def test_dry_run_writes_nothing_and_prints_the_plan(run_dir, tmp_path, capsys):
    assert (
        main(["average", str(run_dir), "--every", "20", "--algo", "wma", "-o", str(tmp_path / "out"), "--dry-run"])
        == 0
    )
    text = capsys.readouterr().out
    assert "WMA of 2 samples" in text and "checkpoint-20" in text and "checkpoint-40" in text
    assert not (tmp_path / "out").exists()


def test_merge_recipe(run_dir, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"run_dir": str(run_dir), "last": 3, "algo": "ema", "alpha": 0.5, "output": str(tmp_path / "merged")}
        )
    )
    assert main(["merge", str(recipe), "--no-progress"]) == 0
    assert yaml.safe_load((tmp_path / "merged" / "pmakit_recipe.yaml").read_text())["alpha"] == 0.5
    assert main(["merge", str(tmp_path / "merged" / "pmakit_recipe.yaml"), "-o", str(tmp_path / "again")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == (
        tmp_path / "again" / "model.safetensors"
    ).read_bytes()


def test_inspect_lists_checkpoints_and_what_a_merge_reads(run_dir, capsys):
    assert main(["inspect", str(run_dir), "--last", "2"]) == 0
    text = capsys.readouterr().out
    assert "4 checkpoint-N folders, steps 10..40, spacing [10]" in text
    assert "checkpoint-10" in text and "SMA of 2 samples" in text and "reads" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["average", "{run}", "--last", "2"], "needs an output folder"),
        (["average", "{run}", "--weights", "1", "2", "-o", "{out}"], "Got 2 weights for 4 samples"),
        (["average", "{run}", "--algo", "ema", "--alpha", "1.5", "-o", "{out}"], "alpha` must lie in (0, 1)"),
        (["average", "{run}/nope", "{run}", "-o", "{out}"], "neither a local folder nor a Hub id"),
        (["merge", "{tmp}/missing.yaml"], "does not exist"),
        (["inspect", "{tmp}/empty"], "neither a local folder"),
    ],
)
def test_bad_input_exits_2_with_one_line(run_dir, tmp_path, capsys, argv, message):
    argv = [a.format(run=run_dir, out=tmp_path / "out", tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pmakit: error: ") and message in err and err.count("\n") == 1


def test_console_script_exit_code(run_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pmakit.cli", "average", str(run_dir), "--start", "99", "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("pmakit: error: No checkpoint of")
    assert len(proc.stderr.strip().splitlines()) == 1
