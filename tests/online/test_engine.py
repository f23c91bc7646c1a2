"""The online engine on a bare optimizer: sampling, the fold, the fp32 guard, swap and write-back."""

import math

import pytest
import torch

from pmakit import PmaConfig
from pmakit.averaging import AveragingRule
from pmakit.online.engine import AVG_KEY, attach_engine
from tests.helpers.engine import make_model, snapshot, train_and_sample, train_step, weighted_sum


@pytest.mark.parametrize("algo", ["sma", "ema", "wma", "weights"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_average_matches_fp64_closed_form(algo, dtype):
    weights = [0.5, 2.0, 1.0, 3.0] if algo == "weights" else None
    config = PmaConfig(
        fused_algo=algo, ema_alpha=0.3, fused_num=4, interleave_step=3, start_step=2, fused_weights=weights
    )
    model, engine, snapshots, sample_steps = train_and_sample(config, dtype)
    assert sample_steps == [3, 6, 9] and engine.step == 11 and engine.num_samples == 3
    expected = weighted_sum(
        snapshots, AveragingRule(algo, 0.3, tuple(weights[:3]) if weights else None).weights_for(3)
    )
    averages = engine.averages()
    # The tolerance comes from where rounding happens. A bf16 (or fp32) sample is exact in fp32 and in
    # the fp64 snapshots, so the parameter dtype adds no error; only the fp32 fold rounds. Each of its
    # n - 1 lerps ``avg + c (x - avg)`` rounds c, the difference, the product and the sum: at most 4
    # roundings of size u32 * 2M, where M = max_i |x_i| bounds every operand (the weights are convex).
    u32 = torch.finfo(torch.float32).eps / 2
    n = len(snapshots)
    # An average kept in the parameter dtype would be off by up to half a bf16 ulp (2^-9 relative):
    # far above this bound, so the test fails if the fp32 accumulator is lost.
    assert 8 * (n - 1) * u32 < torch.finfo(torch.bfloat16).eps / 2 / 100
    for i, (p, ref) in enumerate(zip(model.parameters(), expected, strict=True)):
        assert averages[p].dtype == torch.float32
        largest = torch.stack([s[i].abs() for s in snapshots]).amax(dim=0)
        bound = 8 * (n - 1) * u32 * largest
        assert ((averages[p].double() - ref).abs() <= bound).all()


def test_cycle_end_calls_handlers_then_restarts():
    config = PmaConfig(fused_num=2, interleave_step=1)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = attach_engine(optimizer, config)
    seen = []
    engine.add_cycle_handler(lambda eng, step: seen.append((step, list(eng.counters["sample_steps"]))))
    for t in range(1, 6):
        train_step(model, optimizer, t)
    assert seen == [(2, [1, 2]), (4, [3, 4])]
    assert engine.num_cycles == 2 and engine.num_samples == 1 and engine.counters["sample_steps"] == [5]


def test_no_work_on_steps_without_sample(monkeypatch):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # momentum: SGD keeps per-parameter state
    engine = attach_engine(optimizer, PmaConfig(interleave_step=4, fused_num=100))
    calls = []
    original = engine._fold
    monkeypatch.setattr(engine, "_fold", lambda c, **anchors: (calls.append(c), original(c, **anchors)))
    for t in range(1, 10):
        train_step(model, optimizer, t)
    assert calls == [1.0, 0.5]
    assert AVG_KEY in optimizer.state[next(model.parameters())]


def test_fp32_average_survives_load_state_dict_for_bf16_params():
    config = PmaConfig(fused_algo="ema", ema_alpha=0.1, interleave_step=1, fused_num=50)
    model = make_model(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = attach_engine(optimizer, config)
    for t in range(1, 6):
        train_step(model, optimizer, t)
    saved = optimizer.state_dict()
    reference = {i: optimizer.state[p][AVG_KEY].clone() for i, p in enumerate(model.parameters())}
    # the value must carry fp32 bits that bf16 cannot hold, or the test could not fail
    assert any((ref.bfloat16().float() != ref).any() for ref in reference.values())

    plain = torch.optim.AdamW(make_model(torch.bfloat16).parameters(), lr=1e-2)
    plain.load_state_dict(saved)  # without the engine torch casts the average to bf16
    assert next(iter(plain.state.values()))[AVG_KEY].dtype == torch.bfloat16

    fresh_model = make_model(torch.bfloat16)
    fresh = torch.optim.AdamW(fresh_model.parameters(), lr=1e-2)
    fresh_engine = attach_engine(fresh, config)
    fresh.load_state_dict(saved)
    for i, p in enumerate(fresh_model.parameters()):
        restored = fresh.state[p][AVG_KEY]
        assert restored.dtype == torch.float32
        assert torch.equal(restored, reference[i])
    assert fresh_engine.counters == engine.counters


def test_swapped_is_exact_and_restores_bitwise():
    model = make_model(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = attach_engine(optimizer, PmaConfig(interleave_step=1, fused_num=10))
    for t in range(1, 5):
        train_step(model, optimizer, t)
    before = [p.detach().clone() for p in model.parameters()]
    averages = engine.averages()
    with engine.swapped():
        for p in model.parameters():
            assert torch.equal(p, averages[p].to(p.dtype))
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_write_back_copies_merge_and_keeps_moments():
    config = PmaConfig(interleave_step=1, fused_num=3, write_back=True)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = attach_engine(optimizer, config)
    snapshots = []
    merged_at_end = {}

    def capture(eng, step):  # runs before the write-back: live weights are still the third sample
        merged_at_end.update({p: a.clone() for p, a in eng.averages().items()})
        snapshots.append(snapshot(model))

    engine.add_cycle_handler(capture)
    for t in range(1, 3):
        train_step(model, optimizer, t)
        snapshots.append(snapshot(model))
    moments = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]
    train_step(model, optimizer, 3)  # third sample: cycle ends, merge written back
    for p in model.parameters():
        assert torch.equal(p.detach(), merged_at_end[p])
    expected = weighted_sum(snapshots, [1 / 3] * 3)
    for p, ref in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach().double(), ref, rtol=1e-6, atol=1e-6)
    # moments are the optimizer's own, updated by step 3 and not reset
    pairs = zip(model.parameters(), moments, strict=True)
    assert all(not torch.equal(optimizer.state[p]["exp_avg"], m) for p, m in pairs)
    assert all(optimizer.state[p]["step"].item() == 3 for p in model.parameters())


def test_skipped_fp16_overflow_step_is_not_counted():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = attach_engine(optimizer, PmaConfig(interleave_step=1, fused_num=10))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    x = torch.randn(3, 8)
    loss = model(x).pow(2).mean()
    scaler.scale(loss).backward()
    next(model.parameters()).grad[0, 0] = math.inf  # overflow: the scaler skips optimizer.step
    scaler.step(optimizer)
    scaler.update()
    assert engine.step == 0 and not engine.has_average
    optimizer.zero_grad()
    scaler.scale(model(x).pow(2).mean()).backward()
    scaler.step(optimizer)
    assert engine.step == 1 and engine.num_samples == 1


def test_attach_is_idempotent_and_checks_settings():
    optimizer = torch.optim.SGD(make_model().parameters(), lr=0.1)
    config = PmaConfig(interleave_step=2)
    assert attach_engine(optimizer, config) is attach_engine(optimizer, config)
    with pytest.raises(ValueError, match="different settings"):
        attach_engine(optimizer, PmaConfig(interleave_step=3))


def test_reading_before_any_sample_is_a_clear_error():
    engine = attach_engine(torch.optim.SGD(make_model().parameters(), lr=0.1), PmaConfig())
    with pytest.raises(RuntimeError, match="no sample yet"):
        engine.averages()


def test_cpu_offload_keeps_average_on_cpu():
    """offload="cpu" puts the average on the CPU whatever device the parameters are on.

    On a machine without a GPU, parameters on the ``meta`` device stand in for an accelerator: the
    engine allocates its averages at the first step (no sample yet, interleave_step=2) and restores
    them on `load_state_dict`; both must land on the CPU in fp32, not on the parameters' device.
    """
    model = torch.nn.Linear(8, 4, device="meta")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    engine = attach_engine(optimizer, PmaConfig(interleave_step=2, offload="cpu"))
    model(torch.randn(2, 8, device="meta")).sum().backward()
    optimizer.step()
    assert engine.step == 1 and engine.num_samples == 0
    for p in model.parameters():
        assert optimizer.state[p]["exp_avg"].device.type == "meta"  # the optimizer's own state stays put
        assert optimizer.state[p][AVG_KEY].device.type == "cpu" and optimizer.state[p][AVG_KEY].dtype == torch.float32

    restored_model = torch.nn.Linear(8, 4, device="meta")
    restored = torch.optim.AdamW(restored_model.parameters(), lr=0.1)
    attach_engine(restored, PmaConfig(interleave_step=2, offload="cpu"))
    restored.load_state_dict(optimizer.state_dict())
    assert all(restored.state[p][AVG_KEY].device.type == "cpu" for p in restored_model.parameters())


def test_cpu_offload_of_cpu_params_is_the_same_average():
    results = []
    for offload in ("none", "cpu"):
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        engine = attach_engine(
            optimizer, PmaConfig(fused_algo="ema", interleave_step=1, fused_num=100, offload=offload)
        )
        for t in range(1, 5):
            train_step(model, optimizer, t)
        results.append([engine.averages()[p] for p in model.parameters()])
    assert all(a.device.type == "cpu" and torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offload_matches_on_device_average():
    results = []
    for offload in ("none", "cpu"):
        model = make_model().cuda()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        engine = attach_engine(
            optimizer, PmaConfig(fused_algo="ema", interleave_step=1, fused_num=100, offload=offload)
        )
        for t in range(1, 8):
            x = torch.randn(5, 8, generator=torch.Generator().manual_seed(t)).cuda()
            model(x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        averages = engine.averages()
        if offload == "cpu":
            assert all(a.device.type == "cpu" and a.is_pinned() for a in averages.values())
        results.append([averages[p].cpu() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
