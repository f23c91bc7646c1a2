"""Smoke run of benchmarks/update.py on a tiny model: the tables come out and the numbers hang together.

No timing assertion: this machine is shared and noisy. The numbers are checked against each other
(the bound is the copy scaled to PMA's bytes, the ratios are the medians' ratios) and the script's own
correctness check is checked against what fp32 and bf16 arithmetic allow.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch


SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "update.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("pmakit_bench_update", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_param_count() -> int:
    hidden, inter, layers, vocab = 64, 128, 2, 512  # tied embeddings, no biases
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    return vocab * hidden + layers * per_layer + hidden


def test_tiny_run_prints_tables_and_consistent_numbers(bench, tmp_path, capsys):
    threads = torch.get_num_threads()
    out, js = tmp_path / "update.md", tmp_path / "update.json"
    results = bench.main(
        ["--device", "cpu", "--size", "tiny", "--reps", "3", "--warmup", "1", "--out", str(out), "--json", str(js)]
    )
    printed = capsys.readouterr().out
    assert torch.get_num_threads() == threads  # the script restores the thread count

    text = out.read_text()
    assert text in printed
    assert "| params | method | B/param moved | median ms |" in text
    for label in (
        "pmakit `PmaEngine.sample()`",
        "torch `AveragedModel` EMA",
        "`_foreach_copy_`",
        "bound: 12 B/param",
        "bound: 10 B/param",
        "upcast 2^16 + lerp",
        "mul_+add_",
    ):
        assert label in text
    assert json.loads(js.read_text())["results"][1]["dtype"] == "bf16"

    assert [r["dtype"] for r in results] == ["fp32", "bf16"]
    pma_bytes, copy_bytes = {"fp32": 12, "bf16": 10}, {"fp32": 8, "bf16": 4}
    for r in results:
        d = r["dtype"]
        assert r["params"] == tiny_param_count() and r["tensors"] == 2 * 9 + 2
        for key in ("pma", "averaged_model", "copy"):
            st = r["stats"][key]
            assert 0 < st["q1"] <= st["median"] <= st["q3"] < 1.0 and math.isfinite(st["iqr"])
        assert r["bound_ms"] == pytest.approx(r["copy_ms"] * pma_bytes[d] / copy_bytes[d])
        assert r["pct_of_bound"] == pytest.approx(100 * r["bound_ms"] / r["pma_ms"])
        assert r["pma_over_averaged_model"] == pytest.approx(r["pma_ms"] / r["averaged_model_ms"])
        assert r["pma_gbps"] == pytest.approx(pma_bytes[d] * r["params"] / r["pma_ms"] / 1e6)
        assert f"| {d} | pmakit `PmaEngine.sample()` | {pma_bytes[d]} | {r['pma_ms']:.2f} |" in text
        # fp32 average, exact samples: fp32 rounding only
        assert r["check"]["pma_rel_err"] < 1e-6
    fp32, bf16 = results
    # AveragedModel keeps a bf16 average: bf16 rounding (~1e-3), which the fp32 average avoids
    assert 1e-4 < bf16["check"]["averaged_model_rel_err"] < 1e-2
    assert fp32["check"]["averaged_model_rel_err"] < 1e-6


def test_bad_arguments_name_the_option(bench, capsys):
    with pytest.raises(SystemExit) as err:
        bench.main(["--device", "cpu", "--dtypes", "fp16"])
    assert err.value.code == 2
    assert "--dtypes: unknown dtype 'fp16'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--clock", "cpu", "--threads", "2"])
    assert "--threads 1" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_run_on_cuda(bench, capsys):
    results = bench.main(["--device", "cuda", "--size", "tiny", "--reps", "3", "--warmup", "1"])
    assert "CUDA events" in capsys.readouterr().out
    for r in results:
        assert r["check"]["pma_rel_err"] < 1e-6
        assert all(0 < r["stats"][k]["median"] < 1.0 for k in ("pma", "averaged_model", "copy"))
