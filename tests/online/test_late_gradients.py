"""Parameters that get their first gradient after a PMA sample, on bare optimizers (issue 17, item 4).

The average of such a parameter must never become optimizer state the optimizer sees: Adam and
Adafactor initialise a parameter's state only while it is empty, and Adam's ``__setstate__`` wants a
``step`` in any non-empty state. References are independent of the engine: the same training without
PMA (bitwise) and fp64 snapshots of the live weights combined in closed form.
"""

from __future__ import annotations

import io

import pytest
import torch
import transformers

from pmakit import PmaConfig
from pmakit.online.engine import AVG_KEY, attach_engine, engine_of
from tests.helpers.engine import attach_around_load
from tests.helpers.gated import CONDITIONAL, gated_llama
from tests.helpers.models import SEQ, VOCAB


CONFIG = PmaConfig(interleave_step=2, fused_num=3)  # SMA of the samples at steps 2, 4, 6; then 8, ...
STEPS = 8
SAVE_AT = 3  # between the samples at 2 and 4: late_head has an average but no optimizer state yet

OPTIMIZERS = {
    "adamw_foreach": lambda params: torch.optim.AdamW(params, lr=1e-2, foreach=True),
    "adamw_fused": lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True),
    "adafactor_torch": lambda params: torch.optim.Adafactor(params, lr=1e-2),
    "adafactor_hf": lambda params: transformers.Adafactor(params, lr=1e-2, scale_parameter=False, relative_step=False),
}


def batch(step: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(100 + step))


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def train(model, optimizer, steps, snapshots=None) -> None:
    for step in steps:
        model.current_step = step
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if snapshots is not None:
            snapshots[step] = {n: p.detach().double().clone() for n, p in trainable(model).items()}


def start(kind: str, pma: bool):
    model = gated_llama()
    optimizer = OPTIMIZERS[kind](list(trainable(model).values()))
    merged = {}
    if pma:
        engine = attach_engine(optimizer, CONFIG)
        engine.add_cycle_handler(lambda e, step: merged.update({step: _named(model, e.averages())}))
    return model, optimizer, merged


def _named(model, averages: dict) -> dict[str, torch.Tensor]:
    return {name: averages[p].clone() for name, p in trainable(model).items()}


def saved(optimizer) -> dict:
    """The optimizer state as the Trainer writes and reads it (through torch.save / torch.load)."""
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_shadow_pma_leaves_training_bitwise_and_averages_in_closed_form(kind):
    plain, plain_opt, _ = start(kind, pma=False)
    snapshots = {}
    train(plain, plain_opt, range(1, STEPS + 1), snapshots)

    model, optimizer, merged = start(kind, pma=True)
    train(model, optimizer, range(1, 5))
    late = model.late_head.weight
    assert len(optimizer.state.get(late, {})) == 0, "two samples taken, no gradient yet: no optimizer state"
    train(model, optimizer, range(5, STEPS + 1))

    for name, p in trainable(model).items():
        assert torch.equal(p, trainable(plain)[name]), f"{kind}: PMA changed the training of {name}"
        assert AVG_KEY in optimizer.state[p], f"{name}: once the optimizer has state, the average lives in it"
    for name, average in merged[6].items():  # the live value at each sample, trained or not yet
        reference = sum(snapshots[t][name] for t in (2, 4, 6)) / 3
        torch.testing.assert_close(average.double(), reference, rtol=1e-6, atol=1e-7, msg=name)
    late_samples = [snapshots[t]["late_head.weight"] for t in (2, 4, 6)]  # untrained at 2 and 4, trained by 6
    assert torch.equal(late_samples[0], late_samples[1]) and not torch.equal(late_samples[1], late_samples[2])


@pytest.mark.parametrize("attach", ["before_load", "after_load"])
@pytest.mark.parametrize("kind", ["adamw_foreach", "adafactor_torch"])
def test_resume_between_samples_is_bitwise(kind, attach):
    """``after_load`` is the `PmaCallback` route: the Trainer loads the optimizer before the engine attaches."""
    model, optimizer, merged = start(kind, pma=True)
    train(model, optimizer, range(1, SAVE_AT + 1))
    state = saved(optimizer)
    weights = {n: t.clone() for n, t in model.state_dict().items()}
    assert all(set(entry) != {AVG_KEY} for entry in state["state"].values()), "an average alone as optimizer state"
    train(model, optimizer, range(SAVE_AT + 1, STEPS + 1))

    resumed = gated_llama(seed=7)
    resumed.load_state_dict(weights)
    optimizer2 = OPTIMIZERS[kind](list(trainable(resumed).values()))
    engine = attach_around_load(optimizer2, state, attach, lambda o: attach_engine(o, CONFIG))
    merged2 = {}
    engine.add_cycle_handler(lambda e, step: merged2.update({step: _named(resumed, e.averages())}))
    train(resumed, optimizer2, range(SAVE_AT + 1, STEPS + 1))

    averages = _named(model, engine_of(optimizer).averages())
    for name, average in _named(resumed, engine.averages()).items():
        assert torch.equal(trainable(resumed)[name], trainable(model)[name]), name
        assert torch.equal(average, averages[name]), name
        assert torch.equal(merged2[6][name], merged[6][name]), name
    assert engine.counters == engine_of(optimizer).counters


def test_loading_a_state_dict_with_an_average_alone_does_not_break_adam():
    """Checkpoints of earlier versions hold ``{"pma_avg": ...}`` as a parameter's whole state: the average is kept."""
    model, optimizer, _ = start("adamw_foreach", pma=True)
    train(model, optimizer, range(1, SAVE_AT + 1))
    state = saved(optimizer)
    groups = state["param_groups"]
    for position, avg in groups[0].pop("pma_avg_pending", {}).items():
        state["state"][[i for g in groups for i in g["params"]][position]] = {AVG_KEY: avg}
    assert any(set(entry) == {AVG_KEY} for entry in state["state"].values())

    resumed = gated_llama()
    resumed.load_state_dict(model.state_dict())
    optimizer2 = OPTIMIZERS["adamw_foreach"](list(trainable(resumed).values()))
    engine = attach_engine(optimizer2, CONFIG)
    optimizer2.load_state_dict(state)
    train(resumed, optimizer2, range(SAVE_AT + 1, STEPS + 1))
    train(model, optimizer, range(SAVE_AT + 1, STEPS + 1))
    averages = _named(model, engine_of(optimizer).averages())
    for name, average in _named(resumed, engine.averages()).items():
        assert torch.equal(average, averages[name]), name
    assert set(CONDITIONAL) <= set(averages)


def test_an_average_a_loader_dropped_restarts_from_the_live_weights_with_a_warning():
    """Zeros would shrink the merge (the fold lerps from them); the live weights are the best guess left."""
    model, optimizer, merged = start("adamw_foreach", pma=True)
    train(model, optimizer, range(1, SAVE_AT + 1))
    state = saved(optimizer)
    state["param_groups"][0].pop("pma_avg_pending")  # late_head's average, not trained yet
    weights = {n: t.clone() for n, t in model.state_dict().items()}
    train(model, optimizer, range(SAVE_AT + 1, STEPS + 1))

    resumed = gated_llama()
    resumed.load_state_dict(weights)
    optimizer2 = OPTIMIZERS["adamw_foreach"](list(trainable(resumed).values()))
    engine = attach_engine(optimizer2, CONFIG)
    optimizer2.load_state_dict(state)
    merged2 = {}
    engine.add_cycle_handler(lambda e, step: merged2.update({step: _named(resumed, e.averages())}))
    with pytest.warns(UserWarning, match=r"1 parameter\(s\) have no stored average"):
        train(resumed, optimizer2, range(SAVE_AT + 1, STEPS + 1))
    # late_head's samples at 2 and 4 were its untrained value, which the restarted average starts from
    assert torch.equal(merged2[6]["late_head.weight"], merged[6]["late_head.weight"])
