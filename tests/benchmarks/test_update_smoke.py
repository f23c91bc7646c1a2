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
    for label in ("pmakit `PmaEngine.sample()`", "torch `AveragedModel` EMA", "`_foreach_copy_`", "bound: 12 B/param",
                  "bound: 10 B/param", "upcast 2^16 + lerp", "mul_+add_"):
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


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def assert_same(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Bitwise on CPU (same kernels); on CUDA within one fp32 rounding, since the reference's per-tensor
    lerp kernel is compiled apart from the foreach one and may contract its multiply-add differently."""
    if out.device.type == "cpu":
        assert torch.equal(out, ref)
    else:
        torch.testing.assert_close(out, ref, rtol=2.5e-7, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_upcast_fold_equals_lerp_on_upcast_samples_bitwise(device):
    """The chunked fold the benchmark measures is exactly ``lerp_(x.float())``, whatever the slicing."""
    from pmakit.fused_fold import fold_into

    generator = torch.Generator().manual_seed(3)
    shapes = [(513, 7), (1,), (64, 64), (3, 5, 11), (1000,)]
    for dtype in (torch.bfloat16, torch.float16):
        samples = [torch.randn(s, generator=generator).to(device=device, dtype=dtype) for s in shapes]
        samples.append(torch.randn(40, 30, generator=generator).to(device=device, dtype=dtype).t())  # strided
        start = [torch.randn(x.shape, generator=generator).to(device) for x in samples]
        for c in (0.37, 1e-3, 0.9):
            ref = [a.clone() for a in start]
            for a, x in zip(ref, samples):
                a.lerp_(x.float(), c)
            for chunk in (1, 97, 4096, None):
                out = [a.clone() for a in start]
                fold_into(out, samples, c, chunk=chunk)
                for o, r in zip(out, ref):
                    assert_same(o, r)


@pytest.mark.parametrize("device", DEVICES)
def test_cached_fold_plan_is_reused_and_follows_moved_data(device):
    """The engine keeps the plan per group; it must follow parameters whose ``.data`` was replaced."""
    from pmakit.fused_fold import fold_into

    generator = torch.Generator().manual_seed(4)
    samples = [torch.randn(s, generator=generator).to(device=device, dtype=torch.bfloat16) for s in [(300,), (20, 9)]]
    avgs = [torch.randn(x.shape, generator=generator).to(device) for x in samples]
    ref = [a.clone() for a in avgs]
    cache: dict = {}
    for step in range(3):
        if step == 2:  # e.g. `module.to()` swaps `.data`: the old slices would read stale memory
            samples[0].data = torch.randn(300, generator=generator).to(device=device, dtype=torch.bfloat16)
        plan_before = cache.get("upcast")
        fold_into(avgs, samples, 0.25, chunk=128, cache=cache)
        for a, x in zip(ref, samples):
            a.lerp_(x.float(), 0.25)
        for a, r in zip(avgs, ref):
            assert_same(a, r)
        assert (cache["upcast"] is plan_before) == (step == 1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_run_on_cuda(bench, capsys):
    results = bench.main(["--device", "cuda", "--size", "tiny", "--reps", "3", "--warmup", "1"])
    assert "CUDA events" in capsys.readouterr().out
    for r in results:
        assert r["check"]["pma_rel_err"] < 1e-6
        assert all(0 < r["stats"][k]["median"] < 1.0 for k in ("pma", "averaged_model", "copy"))
