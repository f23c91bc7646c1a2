"""The engine's public hook registries, and the backend adapters `attach_engine` runs (the engine knows no backend)."""

import torch

from pmakit import PmaConfig
from pmakit.online.engine import attach_engine, engine_of
from pmakit.online.hooks import BACKENDS, Hooks
from tests.helpers.engine import ZeroLike, make_model, train_step


class Recorder:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def __call__(self, engine, step):
        self.log.append((self.name, step, engine.num_samples))


def test_hooks_are_an_ordered_set_that_may_change_while_it_runs():
    hooks, calls = Hooks("test"), []

    def once(x):
        calls.append(("once", x))
        hooks.remove(once)  # a hook may remove itself while the registry runs

    def every(x):
        calls.append(("every", x))

    assert hooks.add(once) is once
    hooks.add(every)
    hooks.add(once)  # twice: kept once, in its first place
    assert list(hooks) == [once, every] and len(hooks) == 2 and once in hooks
    hooks.run(1)
    hooks.run(2)
    assert calls == [("once", 1), ("every", 1), ("every", 2)]
    hooks.remove(once)  # not registered any more: ignored
    assert list(hooks) == [every] and "test" in repr(hooks)


def test_find_returns_the_first_hook_of_a_type():
    hooks, log = Hooks(), []
    first, second = Recorder("a", log), Recorder("b", log)
    hooks.add(print)
    assert hooks.find(Recorder) is None
    hooks.add(first)
    hooks.add(second)
    assert hooks.find(Recorder) is first
    hooks.clear()
    assert len(hooks) == 0


def test_engine_runs_its_registries_in_order():
    """on_sample (stored samples), then on_fold (every sample), then on_cycle_end; the aliases add to them."""
    config = PmaConfig(fused_num=2, interleave_step=1, sample_store=True)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine, log = attach_engine(optimizer, config), []
    engine.add_sample_handler(Recorder("sample", log))
    engine.add_fold_handler(Recorder("fold", log))
    engine.add_cycle_handler(Recorder("cycle", log))
    joins = []
    engine.add_join_hook(lambda: joins.append(engine.step))
    assert [len(engine.on_sample), len(engine.on_fold), len(engine.on_cycle_end), len(engine.on_join)] == [1, 1, 1, 1]
    for t in range(1, 3):
        train_step(model, optimizer, t)
    assert log == [("sample", 1, 1), ("fold", 1, 1), ("sample", 2, 2), ("fold", 2, 2), ("cycle", 2, 2)]
    assert joins  # the fold and the cycle end joined
    engine.on_cycle_end.remove(engine.on_cycle_end.find(Recorder))
    train_step(model, optimizer, 3)
    train_step(model, optimizer, 4)
    assert [entry for entry in log if entry[0] == "cycle"] == [("cycle", 2, 2)]


def test_attach_engine_runs_the_backend_adapters_and_engine_of_finds_the_engine():
    seen = []

    def adapter(engine, optimizer):
        seen.append((engine, optimizer))

    class Wrapper:  # what Accelerate's wrapper looks like to the engine
        def __init__(self, optimizer):
            self.optimizer = optimizer

    optimizer = torch.optim.SGD(make_model().parameters(), lr=0.1)
    wrapped = Wrapper(optimizer)
    assert engine_of(wrapped) is None
    BACKENDS.add(adapter)
    try:
        engine = attach_engine(wrapped, PmaConfig())
    finally:
        BACKENDS.remove(adapter)
    assert seen == [(engine, wrapped)] and engine.optimizer is optimizer
    assert engine_of(wrapped) is engine and engine_of(optimizer) is engine
    assert not engine.deepspeed  # the DeepSpeed adapter (registered by the package) found no ZeRO optimizer


class LinkingZero(ZeroLike):
    """A ZeRO-1/2-like optimizer that links its parameters to views of its state (what `gather` reads through)."""

    def __init__(self, flats):
        super().__init__(flats)
        self.links = 0

    def _lazy_init_hp_params_optimizer_state(self):
        self.links += 1


def test_the_deepspeed_adapter_relinks_when_the_average_is_replaced():
    """`attach_engine` reaches the ZeRO adapter (registered by the package); it relinks the fragments once the
    average exists, not again while the same tensors stay, and again after a load replaced them (`layout_key`)."""
    config = PmaConfig(interleave_step=2, fused_num=10)
    zero = LinkingZero([torch.linspace(-1, 1, 40).requires_grad_(), torch.linspace(0, 2, 24).requires_grad_()])
    engine = attach_engine(zero, config)
    assert engine.deepspeed and engine.layout_key is None
    zero.step()
    key = engine.layout_key
    assert zero.links == 1 and len(key) == 2
    zero.step()
    zero.step()
    assert zero.links == 1 and engine.layout_key == key
    zero.optimizer.load_state_dict(zero.optimizer.state_dict())
    zero.step()
    assert zero.links == 2 and engine.layout_key != key and engine.num_samples == 2
