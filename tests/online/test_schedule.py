"""Merge windows on a bare optimizer: overlapping windows against fp64 closed forms, and their state."""

from __future__ import annotations

import io
import math

import pytest
import torch

from pmakit import PmaConfig
from pmakit.errors import InputError
from pmakit.online.engine import attach_engine
from pmakit.online.schedule import STATE_KEY, MergeWindows
from pmakit.online.windows import MergePlan
from tests.helpers.engine import make_model, snapshot, train_step, weighted_sum
from tests.helpers.references import bema_reference, gap_ema_weights


# Windows of 3 samples (every 2 steps) ending at 6, 8 and 12: {2,4,6}, {4,6,8}, {8,10,12}; 6 and 8 share
# two samples, 8 and 12 one; at steps 4-6 and at step 8 two windows are open.
ENDS, WINDOW, EVERY = [6, 8, 12], 6, 2
A = 0.3


def _decay_cosine(n):
    d = [(1 + math.cos(math.pi * i / n)) / 2 for i in range(n + 1)]
    return [d[i - 1] - d[i] for i in range(1, n + 1)]


# rule settings -> fp64 closed-form weights of n samples at `steps`, written without pmakit
RULES = {
    "sma": ({}, lambda n, steps: [1 / n] * n),
    "wma": ({}, lambda n, steps: [i / (n * (n + 1) / 2) for i in range(1, n + 1)]),
    "ema": (
        {"ema_alpha": A},
        lambda n, steps: [(1 - A) ** (n - 1)] + [A * (1 - A) ** (n - i) for i in range(2, n + 1)],
    ),
    "ema_corrected": (
        {"ema_alpha": A},
        lambda n, steps: [A * (1 - A) ** (n - i) / (1 - (1 - A) ** n) for i in range(1, n + 1)],
    ),
    "weights": ({"fused_weights": [0.5, 2.0, 1.5]}, lambda n, steps: [0.125, 0.5, 0.375]),
    "decay": ({"decay_shape": "cosine"}, lambda n, steps: _decay_cosine(n)),
    "ema_halflife:0.5,step_bias=1": ({}, lambda n, steps: gap_ema_weights(steps, 0.5, 1.0)),
}


# bema (TRL's BEMA) keeps an anchor, theta0, beside each window's average: TRL's defaults, and every parameter changed
BEMA_PARAMS = {"bema": {}, "bema:ema_power=0.3,bias_power=0.6,lag=4,multiplier=2,min_ema_multiplier=0.4": {
    "ema_power": 0.3, "bias_power": 0.6, "lag": 4.0, "multiplier": 2.0, "min_ema_multiplier": 0.4,
}}  # fmt: skip


def _config(algo="sma", ends=ENDS, **settings):
    rule = RULES[algo][0] if algo in RULES else {"merge_max_open": 4}  # two bema windows: 2 x 2 fp32 copies
    return PmaConfig(
        fused_algo=algo, interleave_step=EVERY, merge_steps=ends, merge_window=WINDOW, **{**rule, **settings}
    )


def _setup(config, seed=0, dtype=torch.float32):
    model = make_model(dtype, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = attach_engine(optimizer, config)
    plan = MergePlan(tuple(config.merge_steps), config.merge_window, config.interleave_step)
    windows = MergeWindows(optimizer, plan, config)
    engine.add_fold_handler(windows)
    return model, optimizer, windows


def _run(model, optimizer, windows, steps, merges=None, snapshots=None):
    merges = {} if merges is None else merges
    for t in steps:
        train_step(model, optimizer, seed=t)
        if snapshots is not None:
            snapshots[t] = snapshot(model)
        for merge in windows.take_ready():
            merges[merge.step] = (merge.sample_steps, [merge.averages[p] for p in model.parameters()])
    return merges


@pytest.mark.parametrize("algo", list(RULES))
def test_overlapping_windows_match_fp64_closed_forms(algo):
    config = _config(algo)
    assert config.fused_num == 3  # the engine's own cycle is one window
    model, optimizer, windows = _setup(config)
    snapshots = {}
    merges = _run(model, optimizer, windows, range(1, 14), snapshots=snapshots)
    assert sorted(merges) == ENDS and not windows.open
    u32 = torch.finfo(torch.float32).eps / 2
    for end, (steps, averages) in merges.items():
        assert steps == list(range(end - WINDOW + EVERY, end + 1, EVERY))
        weights = RULES[algo][1](len(steps), steps)
        expected = weighted_sum([snapshots[s] for s in steps], weights)
        for i, (avg, ref) in enumerate(zip(averages, expected, strict=True)):
            # the fp32 fold rounds at most 4 times per lerp, each by u32 * 2 max|x| (see test_engine's bound);
            # the weights of `decay` and `ema_halflife` are themselves rounded fp64 sums: add their few ulps
            largest = torch.stack([snapshots[s][i].abs() for s in steps]).amax(dim=0)
            assert avg.dtype == torch.float32
            assert ((avg.double() - ref).abs() <= 8 * (len(steps) - 1) * u32 * largest + 1e-12).all(), (end, i)


@pytest.mark.parametrize("algo", list(BEMA_PARAMS), ids=["trl-defaults", "all-parameters"])
def test_overlapping_bema_windows_match_trls_closed_form(algo):
    params = BEMA_PARAMS[algo]
    model, optimizer, windows = _setup(_config(algo))
    assert windows.rule.anchors == ("theta0",)
    snapshots = {}
    merges = _run(model, optimizer, windows, range(1, 14), snapshots=snapshots)
    assert sorted(merges) == ENDS and not windows.open
    u32 = torch.finfo(torch.float32).eps / 2
    for end, (steps, averages) in merges.items():
        alpha = (params.get("lag", 10.0) + params.get("multiplier", 1.0) * end) ** -params.get("bias_power", 0.2)
        for i, avg in enumerate(averages):
            samples = [snapshots[s][i] for s in steps]
            merged, ema = bema_reference(samples, steps, **params)  # fp64, TRL's update written out
            # the fold's lerps and the correction round in fp32, on operands at most (1 + 2 alpha) max|x|
            largest = torch.stack([x.abs() for x in samples]).amax(dim=0)
            bound = 8 * (len(steps) + 1) * u32 * (1 + 2 * alpha) * largest
            assert avg.dtype == torch.float32 and ((avg.double() - merged).abs() <= bound).all(), (end, i)
            # the correction was applied: the merge is far from the EMA part at this tolerance
            assert (avg.double() - ema).abs().max() > 1e3 * u32 * samples[0].abs().max(), (end, i)


def test_bema_windows_count_their_anchor_against_merge_max_open():
    message = (
        r"keeps 2 windows open .*each 2 fp32 copies .*theta0\): 4 fp32 copies in all; `merge_max_open`=3 allows 3"
    )
    with pytest.raises(InputError, match=message):
        _config("bema", merge_max_open=3)
    assert _config("bema", ends=[6, 12], merge_max_open=2).merge_max_open == 2  # one window at a time: 2 copies


def test_plan_counts_open_windows():
    plan = MergePlan(tuple(ENDS), WINDOW, EVERY)
    assert plan.size == 3 and plan.sample_steps(8) == [4, 6, 8]
    assert [plan.open_at(t) for t in range(1, 13)] == [
        (), (6,), (), (6, 8), (), (6, 8), (), (8, 12), (), (12,), (), (12,),
    ]  # fmt: skip
    assert plan.most_open() == (6, 8)


def _saved(optimizer):
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("algo", ["wma", "bema"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attach", ["before_load", "after_load"])
def test_resume_mid_window_is_bitwise(attach, dtype, algo):
    config = _config(algo)
    straight = _run(*_setup(config, dtype=dtype), range(1, 14))
    model, optimizer, windows = _setup(config, dtype=dtype)
    _run(model, optimizer, windows, range(1, 6))  # step 5: windows 6 (samples 2, 4) and 8 (sample 4) are open
    assert sorted(windows.open) == [6, 8]
    state, weights = _saved(optimizer), {k: v.clone() for k, v in model.state_dict().items()}
    saved = state["param_groups"][0][STATE_KEY]["open"]
    assert sorted(saved) == ["6", "8"]
    assert all(sorted(w.get("anchors", {})) == list(config.rule.anchors) for w in saved.values())
    if config.rule.anchors:  # theta0 of window 8 is its first sample, step 4's weights, saved as fp32
        assert all(t.dtype == torch.float32 for t in saved["8"]["anchors"]["theta0"].values())
    assert STATE_KEY not in optimizer.param_groups[0]  # saved from the windows, never left in the live groups

    model = make_model(dtype, seed=5)  # other weights: everything must come from the checkpoint
    model.load_state_dict(weights)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = attach_engine(optimizer, config)
    plan = MergePlan(tuple(ENDS), WINDOW, EVERY)
    if attach == "before_load":
        windows = MergeWindows(optimizer, plan, config)
        optimizer.load_state_dict(state)
    else:
        optimizer.load_state_dict(state)
        assert STATE_KEY in optimizer.param_groups[0]  # restored verbatim, until the windows take it
        windows = MergeWindows(optimizer, plan, config)
    assert STATE_KEY not in optimizer.param_groups[0] and sorted(windows.open) == [6, 8]
    engine.add_fold_handler(windows)
    resumed = _run(model, optimizer, windows, range(6, 14))
    assert sorted(resumed) == ENDS
    for end in ENDS:  # a load that cast the accumulators to bf16 would lose the fp32 bits
        assert resumed[end][0] == straight[end][0] and resumed[end][1][0].dtype == torch.float32
        assert all(torch.equal(a, b) for a, b in zip(resumed[end][1], straight[end][1], strict=True)), end


def test_resume_without_the_windows_skips_their_merges():
    config = _config("sma")
    model, optimizer, windows = _setup(config)
    _run(model, optimizer, windows, range(1, 6))
    state = _saved(optimizer)
    del state["param_groups"][0][STATE_KEY]  # a checkpoint written without the windows
    optimizer2 = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer2.load_state_dict(state)
    windows = MergeWindows(optimizer2, MergePlan(tuple(ENDS), WINDOW, EVERY), config)
    attach_engine(optimizer2, config).add_fold_handler(windows)
    with pytest.warns(UserWarning) as caught:
        merges = _run(model, optimizer2, windows, range(6, 14))
    messages = [str(w.message) for w in caught if "window of the merge" in str(w.message)]
    assert len(messages) == 2  # once per skipped merge, not once per sample
    assert "merge at step 6 holds 0 sample(s) where the sample at step 6 should be number 3" in messages[0]
    assert "merge at step 8 holds 0 sample(s)" in messages[1]
    assert sorted(merges) == [12]


def test_windows_of_other_settings_are_dropped_on_resume():
    model, optimizer, windows = _setup(_config("sma"))
    _run(model, optimizer, windows, range(1, 6))
    state = _saved(optimizer)
    other = _config("wma")
    optimizer2 = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer2.load_state_dict(state)
    with pytest.warns(UserWarning, match=r"ending at steps 6, 8\) were taken under other settings .*fused_algo=sma"):
        windows = MergeWindows(optimizer2, MergePlan(tuple(ENDS), WINDOW, EVERY), other)
    assert not windows.open


def test_swapped_restores_the_live_weights_bitwise():
    model, optimizer, windows = _setup(_config("sma"))
    merges = []
    for t in range(1, 7):
        train_step(model, optimizer, seed=t)
        merges += windows.take_ready()
    live = [p.detach().clone() for p in model.parameters()]
    with windows.swapped(merges[0]):
        assert all(torch.equal(p, merges[0].averages[p]) for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), live, strict=True))
