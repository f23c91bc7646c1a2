"""Online BEMA on bare optimizers: theta_0 kept beside the average, the cycle finished with the correction.

References are independent of the engine: TRL's update loop written out in fp64 over snapshots of the
live weights (`bema_reference`), and the same run without interruption (bitwise) for resumes.
"""

from __future__ import annotations

import io

import pytest
import torch

from pmakit import PmaConfig
from pmakit.online.engine import AVG_KEY, attach_engine
from tests.helpers.engine import ZeroLike, attach_around_load, make_model, snapshot, train_and_sample, train_step
from tests.helpers.gated import gated_llama
from tests.helpers.models import SEQ, VOCAB
from tests.helpers.references import bema_reference


THETA0 = "pma_bema_theta0"
U32 = torch.finfo(torch.float32).eps / 2
TRL_DEFAULTS = {}
ALL_PARAMETERS = dict(ema_power=0.3, bias_power=0.6, lag=4.0, multiplier=2.0, min_ema_multiplier=0.4)


def spec(params: dict) -> str:
    return "bema:" + ",".join(f"{k}={v}" for k, v in params.items()) if params else "bema"


def check_close(got: torch.Tensor, samples: list[torch.Tensor], reference: torch.Tensor, alpha: float) -> None:
    """fp32 rounding of the fold (4 roundings a lerp) and of the correction, on operands at most (1 + 2 alpha) M."""
    largest = torch.stack([s.abs() for s in samples]).amax(dim=0)
    bound = 8 * (len(samples) + 1) * U32 * (1 + 2 * alpha) * largest
    assert got.dtype == torch.float32 and ((got.double() - reference).abs() <= bound).all()


@pytest.mark.parametrize("params", [TRL_DEFAULTS, ALL_PARAMETERS], ids=["trl-defaults", "all-parameters"])
@pytest.mark.parametrize(("fused_num", "interleave"), [(1, 1), (2, 3), (5, 1), (5, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merges_are_trls_bema_of_the_cycles_samples(params, fused_num, interleave, dtype):
    config = PmaConfig(fused_algo=spec(params), fused_num=fused_num, interleave_step=interleave)
    merges = {}

    def capture(engine, step):
        merges[step] = [engine.averages()[p].clone() for p in engine.optimizer.param_groups[0]["params"]]

    model = make_model(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = attach_engine(optimizer, config)
    engine.add_cycle_handler(capture)
    snapshots, steps = {}, []
    for t in range(1, 2 * fused_num * interleave + interleave + 1):  # two cycles and one sample of a third
        train_step(model, optimizer, seed=t)
        if config.is_sample_step(t):
            snapshots[t] = snapshot(model)
            steps.append(t)
    assert sorted(merges)[:2] == [steps[fused_num - 1], steps[2 * fused_num - 1]]  # fused_num=1: the third too
    for cycle in (steps[:fused_num], steps[fused_num : 2 * fused_num]):
        alpha = (params.get("lag", 10.0) + params.get("multiplier", 1.0) * cycle[-1]) ** -params.get("bias_power", 0.2)
        for i, got in enumerate(merges[cycle[-1]]):
            samples = [snapshots[t][i] for t in cycle]
            merged, ema = bema_reference(samples, cycle, **params)
            check_close(got, samples, merged, alpha)
            if fused_num > 1:  # the correction was applied: the merge is far from the EMA part at this tolerance
                assert (got.double() - ema).abs().max() > 1e3 * U32 * samples[0].abs().max()
    # the third cycle holds its first sample: the average and theta_0 are that sample, exactly
    for p, x in zip(model.parameters(), snapshots[steps[-1]], strict=True):
        assert torch.equal(engine.averages()[p].double(), x) and torch.equal(optimizer.state[p][THETA0].double(), x)


def test_between_cycle_ends_the_average_is_the_ema_from_theta0():
    config = PmaConfig(fused_algo="bema", fused_num=5, interleave_step=2)
    model, engine, snapshots, steps = train_and_sample(config, steps=7)
    assert steps == [2, 4, 6] and engine.num_samples == 3
    for i, p in enumerate(model.parameters()):
        samples = [s[i] for s in snapshots]
        check_close(engine.averages()[p], samples, bema_reference(samples, steps)[1], 0.0)
        assert torch.equal(engine.optimizer.state[p][THETA0].double(), samples[0])


def test_other_rules_keep_no_anchor():
    model, engine, _, _ = train_and_sample(PmaConfig(fused_algo="ema_halflife:0.5", fused_num=3, interleave_step=1))
    assert all(
        set(engine.optimizer.state[p]) == {"step", "exp_avg", "exp_avg_sq", AVG_KEY} for p in model.parameters()
    )


def saved(optimizer) -> dict:
    """The optimizer state as the Trainer writes and reads it (through torch.save / torch.load)."""
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_mid_cycle_is_bitwise_and_keeps_theta0_in_fp32(dtype):
    """Saved after the samples at 2 and 4 of the cycle 2, 4, 6, 8: theta_0 (step 2) must come back in fp32."""
    config = PmaConfig(fused_algo=spec(ALL_PARAMETERS), fused_num=4, interleave_step=2)
    model = make_model(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = attach_engine(optimizer, config)
    for t in range(1, 6):
        train_step(model, optimizer, seed=t)
    state, weights = saved(optimizer), {k: v.clone() for k, v in model.state_dict().items()}
    assert all(entry[THETA0].dtype == torch.float32 for entry in state["state"].values())
    for t in range(6, 11):
        train_step(model, optimizer, seed=t)

    resumed = make_model(dtype, seed=3)
    resumed.load_state_dict(weights)
    optimizer2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    engine2 = attach_engine(optimizer2, config)
    optimizer2.load_state_dict(state)
    for p in resumed.parameters():
        assert (
            optimizer2.state[p][THETA0].dtype == torch.float32 and optimizer2.state[p][AVG_KEY].dtype == torch.float32
        )
    for t in range(6, 11):
        train_step(resumed, optimizer2, seed=t)
    assert engine2.counters == engine.counters and engine2.counters["merged_steps"] == [2, 4, 6, 8]
    averages, averages2 = engine.averages(), engine2.averages()
    for p, p2 in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(averages[p], averages2[p2])


def test_offload_cpu_of_cpu_params_is_the_same_merge():
    results = []
    for offload in ("none", "cpu"):
        config = PmaConfig(fused_algo="bema", fused_num=3, interleave_step=1, offload=offload)
        model, engine, _, _ = train_and_sample(config, dtype=torch.bfloat16, steps=7)
        results.append([(engine.averages()[p], engine.optimizer.state[p][THETA0]) for p in model.parameters()])
    for (a, theta), (b, theta_off) in zip(*results, strict=True):
        assert torch.equal(a, b) and torch.equal(theta, theta_off) and theta_off.device.type == "cpu"


def test_offloaded_theta0_is_allocated_and_restored_on_the_cpu():
    """Parameters on the ``meta`` device stand in for an accelerator (as in test_engine.py)."""
    config = PmaConfig(fused_algo="bema", interleave_step=2, offload="cpu")
    model = torch.nn.Linear(8, 4, device="meta")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    attach_engine(optimizer, config)
    model(torch.randn(2, 8, device="meta")).sum().backward()
    optimizer.step()
    restored_model = torch.nn.Linear(8, 4, device="meta")
    restored = torch.optim.AdamW(restored_model.parameters(), lr=0.1)
    attach_engine(restored, config)
    restored.load_state_dict(optimizer.state_dict())
    for opt, m in ((optimizer, model), (restored, restored_model)):
        assert all(opt.state[p][THETA0].device.type == "cpu" for p in m.parameters())
        assert all(opt.state[p][THETA0].dtype == torch.float32 for p in m.parameters())


# ---------------------------------------------------------------- parameters without optimizer state yet
def train_gated(model, optimizer, steps) -> None:
    for step in steps:
        model.current_step = step
        ids = torch.randint(1, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(100 + step))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("attach", ["before_load", "after_load"])
def test_theta0_of_a_parameter_without_optimizer_state_is_saved_beside_it(attach):
    """``late_head`` gets its first gradient at step 5: at the save (step 3) its theta_0 is pending."""
    config = PmaConfig(fused_algo="bema", interleave_step=2, fused_num=3)
    model = gated_llama()
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-2)
    engine = attach_engine(optimizer, config)
    train_gated(model, optimizer, range(1, 4))
    state, weights = saved(optimizer), {k: v.clone() for k, v in model.state_dict().items()}
    late = [id(p) for p in trainable(model)].index(id(model.late_head.weight))
    pending = state["param_groups"][0]
    assert (
        set(pending[THETA0 + "_pending"]) == set(pending["pma_avg_pending"]) and late in pending[THETA0 + "_pending"]
    )
    assert all(not set(entry) <= {AVG_KEY, THETA0} for entry in state["state"].values()), "an anchor as whole state"
    train_gated(model, optimizer, range(4, 9))
    assert THETA0 in optimizer.state[model.late_head.weight], "adopted into the state with the average"

    resumed = gated_llama(seed=7)
    resumed.load_state_dict(weights)
    optimizer2 = torch.optim.AdamW(trainable(resumed), lr=1e-2)
    engine2 = attach_around_load(optimizer2, state, attach, lambda o: attach_engine(o, config))
    assert engine2._store.stored(resumed.late_head.weight, THETA0).dtype == torch.float32
    train_gated(resumed, optimizer2, range(4, 9))
    averages, averages2 = engine.averages(), engine2.averages()
    for p, p2 in zip(trainable(model), trainable(resumed), strict=True):
        assert torch.equal(p, p2) and torch.equal(averages[p], averages2[p2])
    assert engine2.counters == engine.counters


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offload_is_the_on_device_merge():
    results = []
    for offload in ("none", "cpu"):
        model = make_model(torch.bfloat16).cuda()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        config = PmaConfig(fused_algo="bema", interleave_step=2, fused_num=3, offload=offload)
        engine, snapshots = attach_engine(optimizer, config), []
        for t in range(1, 7):
            x = torch.randn(5, 8, generator=torch.Generator().manual_seed(t)).cuda().bfloat16()
            model(x).float().pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            snapshots += [[p.detach().double().cpu() for p in model.parameters()]] if t % 2 == 0 else []
        averages = engine.averages()
        theta = [optimizer.state[p][THETA0] for p in model.parameters()]
        assert all(t.is_pinned() for t in theta) if offload == "cpu" else all(t.is_cuda for t in theta)
        for i, p in enumerate(model.parameters()):
            samples = [s[i] for s in snapshots]
            check_close(averages[p].cpu(), samples, bema_reference(samples, [2, 4, 6])[0], 16**-0.2)
        results.append([averages[p].cpu() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_zero_partitions_keep_theta0_in_their_state_and_resume_it():
    """The engine driven from a ZeRO-like optimizer (`attach_deepspeed`): theta_0 sits beside each partition's
    average in its state and resumes through the torch optimizer's state dict (what DeepSpeed's checkpoints save)."""
    config = PmaConfig(fused_algo="bema", interleave_step=2, fused_num=3)
    zero = ZeroLike([torch.linspace(-1, 1, 40).requires_grad_(), torch.linspace(0, 2, 24).requires_grad_()])
    flats = zero.single_partition_of_fp32_groups
    engine, samples = attach_engine(zero, config), []
    for t in range(1, 7):
        zero.step()
        samples += [[flat.detach().double().clone() for flat in flats]] if t % 2 == 0 else []
        if t == 3:
            state, weights = saved(zero.optimizer), [flat.detach().clone() for flat in flats]
    assert engine.deepspeed and all(THETA0 in zero.optimizer.state[flat] for flat in flats)
    for i, flat in enumerate(flats):
        reference = bema_reference([s[i] for s in samples], [2, 4, 6])[0]
        check_close(engine.averages()[flat], [s[i] for s in samples], reference, 16**-0.2)

    zero2 = ZeroLike([w.requires_grad_() for w in weights])
    engine2 = attach_engine(zero2, config)
    zero2.optimizer.load_state_dict(state)
    assert all(zero2.optimizer.state[f][THETA0].dtype == torch.float32 for f in zero2.single_partition_of_fp32_groups)
    for _ in range(4, 7):
        zero2.step()
    for flat, flat2 in zip(flats, zero2.single_partition_of_fp32_groups, strict=True):
        assert torch.equal(engine.averages()[flat], engine2.averages()[flat2])
