"""`offload="cpu"` on CUDA: the average lives in pinned host memory and is updated off the training
stream (side-stream copy, CPU-thread fold). Correctness against the on-device average and an fp64
closed form, joins before every reader, and the GPU memory PMA adds with and without offload."""

import gc

import pytest
import torch

from pmakit import PmaConfig
from pmakit.averaging import AveragingRule
from pmakit.online.engine import AVG_KEY, attach_engine, engine_of
from pmakit.training.export import PmaExporter


pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def mlp(width=256, depth=4, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(width, width) for _ in range(depth)]
    return torch.nn.Sequential(*layers).to("cuda", dtype)


def step(model, optimizer, seed, width):
    x = torch.randn(64, width, generator=torch.Generator().manual_seed(seed)).to(
        "cuda", next(model.parameters()).dtype
    )
    model(x).float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run(offload, steps=9, width=256, algo="sma"):
    model = mlp(width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = PmaConfig(fused_algo=algo, fused_num=4, interleave_step=2, offload=offload)
    engine = attach_engine(optimizer, config)
    snapshots = []
    for t in range(1, steps + 1):
        step(model, optimizer, t, width)
        if config.is_sample_step(t):
            snapshots.append([p.detach().double().cpu() for p in model.parameters()])
    return model, optimizer, engine, snapshots


@pytest.mark.parametrize("algo", ["sma", "ema"])
def test_offloaded_average_matches_device_average_and_closed_form(algo):
    _, _, on_device, snaps = run("none", algo=algo)
    model, _, offloaded, snaps_off = run("cpu", algo=algo)
    dev, off = on_device.averages(), offloaded.averages()
    assert all(a.device.type == "cpu" and a.is_pinned() and a.dtype == torch.float32 for a in off.values())
    weights = AveragingRule(algo, 0.2).weights_for(4)
    for (_, a_dev), (_, a_off), i in zip(dev.items(), off.items(), range(len(snaps[0])), strict=True):
        torch.testing.assert_close(a_off, a_dev.cpu(), rtol=1e-6, atol=1e-7)
        reference = sum(w * s[i] for w, s in zip(weights, snaps_off, strict=True))
        torch.testing.assert_close(a_off.double(), reference, rtol=1e-6, atol=1e-7)


def test_readers_join_the_pending_update(tmp_path):
    """Swap, state_dict/load_state_dict and export read the average right after an asynchronous sample."""
    from tests.helpers.models import SEQ, VOCAB, tiny_llama

    model = tiny_llama(dtype=torch.bfloat16).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = attach_engine(optimizer, PmaConfig(fused_num=4, interleave_step=2, offload="cpu"))

    def train(t):
        ids = torch.randint(1, VOCAB, (8, SEQ), generator=torch.Generator().manual_seed(t)).cuda()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for t in range(1, 11):  # a cycle ends at step 8; step 10 starts the next one (a copy, still in flight)
        train(t)
    x10 = [p.detach().float().cpu() for p in model.parameters()]
    with engine.swapped():
        assert all(torch.equal(p.detach().float().cpu(), x) for p, x in zip(model.parameters(), x10, strict=True))
    assert all(torch.equal(p.detach().float().cpu(), x) for p, x in zip(model.parameters(), x10, strict=True))
    state = optimizer.state_dict()
    assert all(torch.equal(state["state"][i][AVG_KEY], x) for i, x in enumerate(x10))
    optimizer.load_state_dict(state)  # casts state to bf16 on the GPU; the guard puts pinned fp32 back
    assert all(a.is_pinned() and a.dtype == torch.float32 for a in engine.averages().values())
    train(11)
    train(12)  # a second sample in flight when the export reads the average
    x12 = [p.detach().double().cpu() for p in model.parameters()]
    folder = PmaExporter(model, tmp_path, engine.config).export_latest(engine, 12, [10, 12])
    from tests.helpers.training import load_folder

    saved = load_folder(folder)
    for (name, _), a, b in zip(model.named_parameters(), x10, x12, strict=True):
        if name in saved:
            expected = ((a.double() + b) / 2).to(torch.bfloat16)
            assert torch.equal(saved[name], expected), name


def added_peak_memory(offload, n_params_target=64 * 2**20, width=4096):
    """Peak CUDA memory of 12 training steps with PMA minus the same without it (bytes)."""
    depth = max(1, n_params_target // (width * width))
    peaks = []
    for use_pma in (False, True):
        gc.collect()  # the engine and its optimizer form a reference cycle
        torch.cuda.empty_cache()
        model = mlp(width, depth)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if use_pma:
            attach_engine(optimizer, PmaConfig(fused_num=4, interleave_step=2, offload=offload))
        torch.cuda.reset_peak_memory_stats()
        for t in range(1, 13):
            step(model, optimizer, t, width)
        if use_pma:
            engine_of(optimizer).join()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
        n_params = sum(p.numel() for p in model.parameters())
        del model, optimizer
    return peaks[1] - peaks[0], n_params


def test_gpu_memory_added_by_pma_with_and_without_offload():
    added_device, n = added_peak_memory("none")
    added_offload, _ = added_peak_memory("cpu")
    print(
        f"\nPMA GPU memory, {n / 1e6:.1f}M bf16 params + AdamW: peak added by PMA on device = "
        f"{added_device / 2**20:.1f} MiB ({added_device / n:.2f} bytes/param); "
        f"with offload='cpu' = {added_offload / 2**20:.1f} MiB ({added_offload / n:.3f} bytes/param)"
    )
    # One fp32 copy of the weights, plus the fold's fp32 upcast scratch for bf16 weights (at most 2^24 elements).
    scratch = 4 * min(n, 1 << 24)
    assert 0.95 * 4 * n <= added_device <= 1.05 * 4 * n + scratch
    assert added_offload <= 0.02 * 4 * n  # nothing but a few scratch blocks
