"""The streaming fold against fp64 closed forms, the online engine, and its memory bound."""

from __future__ import annotations

import json
import tracemalloc
from fractions import Fraction as F

import numpy as np
import pytest
import torch

from pmakit.averaging import merge_weights
from pmakit.merging import merge
from tests.helpers.folders import read_folder, reference, save_models, write_raw_safetensors
from tests.helpers.models import TokenDataset, tiny_llama
from tests.helpers.training import load_folder, pma_args


EPS32 = 2.0**-24  # unit roundoff of fp32


def _fp32_bound(folders, weights, n):
    """Elementwise bound for an fp32 fold of n terms: (n + 1) u sum_i |w_i x_i| (plus a tiny absolute floor)."""
    states = [read_folder(f) for f in folders]
    return {
        k: (n + 1) * EPS32 * sum(abs(w) * s[k].double().abs() for w, s in zip(weights, states, strict=True)) + 1e-30
        for k in states[0]
    }


@pytest.mark.parametrize(
    ("rule", "closed_form"),
    [
        (dict(algo="sma"), [F(1, 3), F(1, 3), F(1, 3)]),
        (dict(algo="ema", alpha=0.3), [F(49, 100), F(21, 100), F(3, 10)]),  # (1-a)^2, a(1-a), a
        (dict(algo="wma"), [F(1, 6), F(2, 6), F(3, 6)]),  # i / (1 + 2 + 3)
        (dict(weights=[0.5, 2.0, 1.5]), [F(1, 8), F(1, 2), F(3, 8)]),  # w_i / 4
        (dict(weights=[-0.5, 0.0, 1.5], normalize=False), [F(-1, 2), F(0), F(3, 2)]),  # x3 + 0.5 (x3 - x1)
    ],
    ids=["sma", "ema", "wma", "weights", "extrapolate"],
)
def test_rules_match_fp64_closed_form(tmp_path, rule, closed_form):
    """The weights are written by hand from each rule's definition, not taken from the library."""
    folders = save_models(tmp_path, 3)
    w = [float(x) for x in closed_form]
    result = merge(folders, tmp_path / "out", threads=2, block_elements=777, **rule)
    assert result.plan.weights == pytest.approx(w, rel=1e-15, abs=1e-17)
    out, ref, bound = read_folder(tmp_path / "out"), reference(folders, w), _fp32_bound(folders, w, 3)
    assert out.keys() == ref.keys()
    for name in ref:
        assert out[name].dtype == torch.float32
        assert ((out[name].double() - ref[name]).abs() <= bound[name]).all(), name


def test_fp64_accumulation_is_the_fp64_sum_rounded_once(tmp_path):
    folders = save_models(tmp_path, 4)
    w = merge_weights(4, "wma")
    merge(folders, tmp_path / "out", algo="wma", accumulate_dtype="float64", threads=1)
    out, ref = read_folder(tmp_path / "out"), reference(folders, w)
    for name in ref:  # same order of fp64 operations as the reference, one rounding to fp32 at the end
        assert torch.equal(out[name], ref[name].float()), name


def test_bf16_inputs_give_bf16_within_one_rounding(tmp_path):
    folders = save_models(tmp_path, 3, dtype=torch.bfloat16)
    merge(folders, tmp_path / "out", algo="ema", alpha=0.4)
    merge(folders, tmp_path / "out32", algo="ema", alpha=0.4, out_dtype="float32")
    w = merge_weights(3, "ema", alpha=0.4)
    ref, bound = reference(folders, w), _fp32_bound(folders, w, 3)
    out, out32 = read_folder(tmp_path / "out"), read_folder(tmp_path / "out32")
    assert json.loads((tmp_path / "out32" / "config.json").read_text())["dtype"] == "float32"
    for name in ref:
        assert out[name].dtype == torch.bfloat16 and out32[name].dtype == torch.float32
        assert ((out32[name].double() - ref[name]).abs() <= bound[name]).all(), name
        # bf16 output is the fp32 result rounded to nearest even: exactly torch's cast of it
        assert torch.equal(out[name], out32[name].to(torch.bfloat16)), name


def test_offline_merge_of_checkpoints_equals_online_pma(tmp_path):
    """A real PmaTrainer run saving a checkpoint at every sample: merging those offline gives pma-<t>."""
    from pmakit import PmaTrainer

    args = pma_args(
        tmp_path / "run",
        max_steps=6,
        pma_interleave_step=2,
        pma_fused_num=3,
        pma_fused_algo="wma",
        save_strategy="steps",
        save_steps=2,
    )
    PmaTrainer(model=tiny_llama(), args=args, train_dataset=TokenDataset()).train()
    online = load_folder(tmp_path / "run" / "pma-6")
    result = merge(run_dir=tmp_path / "run", last=3, algo="wma", output=tmp_path / "offline")
    assert [s.step for s in result.plan.sources] == [2, 4, 6]
    offline = read_folder(tmp_path / "offline")
    checkpoints = [tmp_path / "run" / f"checkpoint-{s}" for s in (2, 4, 6)]
    states = [read_folder(c) for c in checkpoints]
    assert offline.keys() == online.keys()
    for name in online:
        # online: avg += c_k (x_k - avg) in fp32; offline: sum w_i x_i in fp32. Each is within about
        # n units of roundoff of max_i |x_i| of the exact convex combination, so they agree within 2(n+1)u.
        scale = torch.stack([s[name].abs() for s in states]).amax(0)
        assert ((offline[name] - online[name]).abs() <= 2 * 4 * EPS32 * scale + 1e-30).all(), name


def _big_inputs(root, n, numel=1 << 20):
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        folder = root / f"in{i}"
        folder.mkdir(parents=True)
        data = rng.standard_normal(numel, dtype=np.float32).tobytes()
        header = {"w": {"dtype": "F32", "shape": [numel // 256, 256], "data_offsets": [0, len(data)]}}
        write_raw_safetensors(folder / "model.safetensors", header, data)
        files.append(folder)
    return files


def test_peak_memory_is_bounded_by_the_block_not_the_inputs(tmp_path):
    """4 MiB per input: loading N inputs would show N x 4 MiB; the fold holds a few 16 KiB blocks."""
    peaks = {}
    for n in (2, 8):
        inputs = _big_inputs(tmp_path / f"n{n}", n)
        tracemalloc.start()
        merge(inputs, tmp_path / f"out{n}", algo="wma", threads=1, block_elements=4096)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        ref = sum(
            w * np.fromfile(f / "model.safetensors", np.float32, offset=8 + 80)[-10:].astype(np.float64)
            for w, f in zip(merge_weights(n, "wma"), inputs, strict=True)
        )
        got = read_folder(tmp_path / f"out{n}")["w"].flatten()[-10:].double().numpy()
        assert np.allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert peaks[2] < 1 << 20 and peaks[8] < 1 << 20, peaks  # far below one input (4 MiB)
    assert peaks[8] <= peaks[2] + (128 << 10), peaks  # flat in the number of inputs


# VmHWM (peak RSS of this process image; ru_maxrss would include the forking pytest process)
CHILD = """
import sys
from pmakit.merging import merge
merge(sys.argv[3:], sys.argv[2], algo="wma", reader=sys.argv[1], threads=2)
print([int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""


@pytest.mark.parametrize("reader", ["mmap", "pread"])
def test_peak_rss_is_flat_in_the_number_of_inputs(tmp_path, reader, capsys):
    """16 MiB per input, in a child process: keeping the inputs mapped or buffered would add 96 MiB at N=8."""
    import subprocess
    import sys

    peaks = {}
    for n in (2, 8):
        inputs = _big_inputs(tmp_path / f"n{n}", n, numel=1 << 22)
        out = subprocess.run(
            [sys.executable, "-c", CHILD, reader, str(tmp_path / f"out{n}"), *map(str, inputs)],
            capture_output=True,
            text=True,
            check=True,
        )
        peaks[n] = int(out.stdout.split()[-1])
    assert peaks[8] - peaks[2] < 8 << 20, {n: p / 2**20 for n, p in peaks.items()}
    with capsys.disabled():
        print(f"\n[{reader}] peak RSS N=2 {peaks[2] / 2**20:.1f} MiB, N=8 {peaks[8] / 2**20:.1f} MiB")
