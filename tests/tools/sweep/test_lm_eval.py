"""lm-evaluation-harness scoring: sweep scores equal the `lm_eval` command's for the same folder; training logs them.

The task is a local YAML over a jsonl shipped in tests/tools/sweep/data/lm_eval_task (nothing is downloaded): its
`data_files` path is relative, which lm-eval resolves from the working folder, so every run here starts there.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pmakit import PmaConfig, PmaTrainer, lm_eval_scorer, merge  # noqa: E402
from pmakit.cli import main  # noqa: E402
from pmakit.tools.sweep import sweep_inputs  # noqa: E402
from pmakit.tools.sweep.lm_eval import pma_lm_eval_metrics  # noqa: E402
from tests.helpers.folders import make_tokenizer, save_models  # noqa: E402
from tests.helpers.models import TokenDataset, tiny_llama  # noqa: E402
from tests.helpers.training import pma_args  # noqa: E402


DATA = Path(__file__).resolve().parent / "data" / "lm_eval_task"
TASK = "pmakit_tiny_mc"


def _tokenizer():
    """The tiny word-level tokenizer with an end-of-text token (lm-eval prefixes empty contexts with it)."""
    tokenizer = make_tokenizer()
    tokenizer.eos_token = "t0"
    return tokenizer


@pytest.fixture(autouse=True)
def in_task_folder(monkeypatch):
    monkeypatch.chdir(DATA)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Three different tiny Llamas saved as a run's checkpoint-N folders, each with its tokenizer."""
    root = tmp_path_factory.mktemp("run")
    for folder in save_models(root, 3, names=["checkpoint-2", "checkpoint-4", "checkpoint-6"]):
        _tokenizer().save_pretrained(folder)
    return root


def _lm_eval_command(folder: Path, out: Path) -> tuple[dict, dict]:
    """Run the `lm_eval` command on ``folder``: (its results JSON for the task, the values its table printed)."""
    command = [str(Path(sys.executable).with_name("lm_eval")), "--model", "hf", "--model_args", f"pretrained={folder}"]
    command += ["--tasks", TASK, "--include_path", str(DATA), "--output_path", str(out)]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=DATA, env=env, capture_output=True, text=True, timeout=280, check=True)
    (results_file,) = out.rglob("results_*.json")
    printed = {}
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 7 and cells[4] in ("acc", "acc_norm"):
            printed[cells[4]] = float(cells[6])
    return json.loads(results_file.read_text())["results"][TASK], printed


def test_sweep_and_scorer_equal_the_lm_eval_command(run_dir, tmp_path):
    out = tmp_path / "sweep"
    argv = ["sweep", str(run_dir), "--rules", "wma", "--windows", "1", "3", "--lm-eval-tasks", TASK]
    assert main([*argv, "--lm-eval-include-path", str(DATA), "-o", str(out)]) == 0
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    column = f"{TASK} acc (lm-eval)"
    assert len(rows) == 2 and all(column in r for r in rows)

    direct = tmp_path / "direct"
    merge(sweep_inputs(run_dir), direct, algo="wma")
    reference, printed = _lm_eval_command(direct, tmp_path / "lm_eval_out")
    swept = float(next(r for r in rows if r["rule"] == "wma" and r["window"] == "3")[column])
    assert swept == reference["acc,none"]
    assert printed["acc"] == pytest.approx(swept, abs=5e-5)

    scorer = lm_eval_scorer(TASK, include_path=DATA, metric="acc_norm")
    assert scorer.greater_is_better and scorer(direct) == reference["acc_norm,none"]
    with pytest.warns(FutureWarning, match="`LmEvalScorer.higher_is_better` is deprecated"):
        assert scorer.higher_is_better  # the old name still reads
    assert printed["acc_norm"] == pytest.approx(reference["acc_norm,none"], abs=5e-5)
    best = max(float(r[column]) for r in rows)  # accuracy: the sweep keeps the highest
    assert f"| {best:.6g} | yes |" in (out / "sweep.md").read_text()


def test_unknown_task_fails_before_any_merge(run_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", str(run_dir), "--rules", "sma", "--windows", "2", "--lm-eval-tasks", TASK, "no_such_task"]
    assert main([*argv, "--lm-eval-include-path", str(DATA), "-o", str(out)]) == 2
    assert "'no_such_task'" in capsys.readouterr().err and not out.exists()
    assert main([*argv[:-2], TASK, "--lm-eval-include-path", str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert "is not a folder" in capsys.readouterr().err and not out.exists()


def test_without_lm_eval_the_message_names_the_extra(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what a missing package looks like to `import`
    with pytest.raises(ImportError, match=r"pip install 'pmakit\[lm-eval\]'"):
        lm_eval_scorer(TASK, include_path=DATA)
    argv = ["sweep", str(run_dir), "--rules", "sma", "--windows", "2", "--lm-eval-tasks", TASK, "-o", str(tmp_path)]
    assert main(argv) == 2 and "pmakit[lm-eval]" in capsys.readouterr().err
    with pytest.raises(ValueError, match="set `eval`"):
        PmaConfig(eval_lm_eval_tasks=[TASK])


def test_pma_eval_logs_lm_eval_metrics_of_the_pma_weights(tmp_path):
    args = pma_args(
        tmp_path / "out", max_steps=4, pma_fused_num=10, pma_eval=True, eval_strategy="steps", eval_steps=4,
        per_device_eval_batch_size=1, pma_eval_lm_eval_tasks=[TASK], pma_eval_lm_eval_include_path=str(DATA),
    )  # fmt: skip
    trainer = PmaTrainer(
        model=tiny_llama(), args=args, train_dataset=TokenDataset(), eval_dataset=TokenDataset(4, seed=2),
        processing_class=_tokenizer(),
    )  # fmt: skip
    trainer.train()
    assert any("eval_pma_loss" in e for e in trainer.state.log_history)
    (logged,) = [e for e in trainer.state.log_history if f"eval_pma_{TASK}_acc" in e]
    # the evaluation at the last step saw the average of samples 2 and 4: what the final `pma/` folder holds
    scorer = lm_eval_scorer(TASK, include_path=DATA)
    assert logged[f"eval_pma_{TASK}_acc"] == scorer(tmp_path / "out" / "pma")
    assert logged[f"eval_pma_{TASK}_acc_norm"] == scorer.last_results[TASK]["acc_norm,none"]
    assert not any("stderr" in key for key in logged)

    rng = torch.random.get_rng_state()  # lm-eval seeds the global generators; training keeps its own
    assert pma_lm_eval_metrics(trainer, args.pma_config) and torch.equal(torch.random.get_rng_state(), rng)
