"""The online PMA engine: an fp32 running average kept in the optimizer's own state.

Why the optimizer? Every backend the Trainer supports (single process, DDP, FSDP, DeepSpeed) saves
and restores optimizer state, and shards it like the parameters, so the average survives
checkpoint/resume for free (`pmakit.online.state`; the counters: `pmakit.online.counters`). The
engine hooks the optimizer's ``step``, so it only sees real updates: gradient-accumulation
micro-steps never reach ``step``, and a step that fp16 overflow skipped never calls it.

A sample folds the parameters into the average with the running form of the averaging law,
``avg <- avg + c_k (x_k - avg)``, as a handful of ``torch._foreach_*`` kernels per (device, dtype)
group: no Python loop over tensors, and nothing at all on steps that take no sample. A rule whose
running form keeps anchors (``bema``) folds them alongside, and after the cycle's last sample its
``finish`` corrects the average in place, so that it holds the merge when the cycle-end hooks read
it (`pmakit.online.slots`). With ``offload="cpu"`` the fold runs off the training stream
(`pmakit.online.offload`).

Code around the engine plugs in through its hook registries (`pmakit.online.hooks.Hooks`), never its
internals; backend adapters (DeepSpeed ZeRO) sit above the engine and drive it through
`PmaEngine.drive_externally` and `PmaEngine.on_step`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from ..errors import InputError, TrainingError
from .config import PmaConfig
from .counters import COUNTERS_KEY, Counters
from .counters import cycle_settings as cycle_settings  # moved to counters; importable here as before
from .distributed import unwrap_optimizer
from .hooks import BACKENDS, Hooks
from .layout import build_groups
from .offload import Offload
from .slots import AVG_KEY, SlotGroup, pending_key, slot_keys
from .state import SlotStore


__all__ = ["AVG_KEY", "COUNTERS_KEY", "PENDING_KEY", "PmaEngine", "attach_engine", "engine_of"]

PENDING_KEY = pending_key(AVG_KEY)  # saved averages of parameters without optimizer state: {position: average}

CycleHandler = Callable[["PmaEngine", int], None]


def engine_of(optimizer: torch.optim.Optimizer) -> PmaEngine | None:
    """The engine attached to ``optimizer`` (or to the optimizer inside a wrapper such as Accelerate's), if any."""
    return getattr(unwrap_optimizer(optimizer), "_pma_engine", None)


def attach_engine(optimizer: torch.optim.Optimizer, config: PmaConfig) -> PmaEngine:
    """The engine on ``optimizer``, attaching a new one if it has none (idempotent).

    The backend adapters (`pmakit.online.hooks.BACKENDS`) then follow the wrappers they know: when a
    DeepSpeed ZeRO optimizer sits in the wrapper chain, the engine follows its fp32 master partitions
    (`pmakit.online.deepspeed.attach_deepspeed`).

    Args:
        optimizer: Any `torch.optim.Optimizer` (or a wrapper around one, such as Accelerate's).
        config: The PMA settings, used when a new engine is attached.

    Returns:
        The optimizer's engine.
    """
    engine = engine_of(optimizer)
    if engine is None:
        engine = PmaEngine(unwrap_optimizer(optimizer), config)
    elif engine.config != config:
        raise InputError("This optimizer already carries a PMA engine with different settings.")
    BACKENDS.run(engine, optimizer)
    return engine


class PmaEngine:
    """Online PMA on ``optimizer``. Use `attach_engine`, `PmaCallback`, `PmaTrainer` or `create_pma_optimizer`.

    Hooks (each a `pmakit.online.hooks.Hooks`; ``add``, ``remove``, ``find(type)``, iteration) run on
    every process, since under FSDP2 or ZeRO-3 every process takes part in an export's gathers:

    * ``on_sample``: ``hook(engine, step)`` after each sample the config stores (`PmaConfig.is_stored_step`);
    * ``on_fold``: ``hook(engine, step)`` after every sample (e.g. `pmakit.online.schedule.MergeWindows`);
    * ``on_cycle_end``: ``hook(engine, step)`` after the ``fused_num``-th sample of a cycle, before the
      optional write-back; exporters write ``pma-<step>`` here;
    * ``on_join``: ``hook()`` whenever the engine joins (`join`).

    Sample and fold hooks run after the fold and before the cycle end, so the live parameters are
    exactly the sample just folded.

    At scale the average has exactly the layout of what the optimizer steps: under DDP a full
    fp32 copy per rank (like the optimizer moments), under FSDP2 one fp32 shard per rank (a DTensor
    whose local shard is folded), under DeepSpeed ZeRO the rank's fp32 master partition
    (see `pmakit.online.deepspeed.attach_deepspeed`).

    Args:
        optimizer: The optimizer whose parameters are averaged; the average lives in its state.
        config: The PMA settings.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: PmaConfig) -> None:
        self.optimizer = optimizer
        self.config = config
        self.rule = config.rule
        self.on_sample: Hooks[CycleHandler] = Hooks("on_sample")
        self.on_fold: Hooks[CycleHandler] = Hooks("on_fold")
        self.on_cycle_end: Hooks[CycleHandler] = Hooks("on_cycle_end")
        self.on_join: Hooks[Callable[[], None]] = Hooks("on_join")
        self._counters = Counters(optimizer, config)
        # The tensors kept per parameter: the average, then the rule's anchors.
        self._store = SlotStore(optimizer, slot_keys(self.rule), config.offload == "cpu")
        self._offload = Offload()
        self._groups: list[SlotGroup] | None = None
        self._signature: tuple | None = None
        self._loading_counters = True  # whether the state dict being loaded carries PMA counters
        self._param_source: Callable[[], list[list[torch.Tensor]]] | None = None
        optimizer._pma_engine = self
        self._step_hook = optimizer.register_step_post_hook(self._after_step)
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_load_state_dict_pre_hook(self._before_load)
        optimizer.register_load_state_dict_post_hook(self._after_load)
        optimizer.register_state_dict_pre_hook(self._before_save)
        optimizer.register_state_dict_post_hook(self._after_save)
        if self._counters.stored:  # attached after a checkpoint was loaded
            self._counters.reconcile()
        self._store.take_loaded_pending()

    # ------------------------------------------------------------------ counters
    def start_counting_at(self, step: int) -> None:
        """Count optimizer steps from ``step`` when nothing was counted yet (a resume from a checkpoint
        written without PMA): step numbers, sample steps and ``pma-<step>`` names then follow the
        Trainer's ``global_step``. Counters restored from a PMA checkpoint are left as they are."""
        self._counters.start_at(step)

    @property
    def counters(self) -> dict:
        """Step, sample and cycle counters (a decoded copy); stored in the optimizer so that they resume with it."""
        return self._counters.decoded()

    @property
    def step(self) -> int:
        """Real optimizer steps seen so far."""
        return self._counters.raw()["step"]

    @property
    def num_samples(self) -> int:
        """Samples folded into the current cycle."""
        return self._counters.raw()["count"]

    @property
    def num_cycles(self) -> int:
        return self._counters.raw()["cycles"]

    @property
    def has_average(self) -> bool:
        """Whether the average holds anything (a sample this cycle, or the merge of the last cycle)."""
        return self._counters.has_average()

    @property
    def deepspeed(self) -> bool:
        """Whether the average shadows DeepSpeed ZeRO's fp32 partitions (set by `attach_deepspeed`)."""
        return self._store.in_state

    @deepspeed.setter
    def deepspeed(self, value: bool) -> None:
        self._store.in_state = bool(value)

    # ------------------------------------------------------------------ hooks (aliases of the registries)
    def add_cycle_handler(self, handler: CycleHandler) -> None:
        """``on_cycle_end.add(handler)``."""
        self.on_cycle_end.add(handler)

    def add_sample_handler(self, handler: CycleHandler) -> None:
        """``on_sample.add(handler)``: run ``handler(engine, step)`` after each stored sample."""
        self.on_sample.add(handler)

    def add_fold_handler(self, handler: CycleHandler) -> None:
        """``on_fold.add(handler)``: run ``handler(engine, step)`` after every sample."""
        self.on_fold.add(handler)

    def add_join_hook(self, hook: Callable[[], None]) -> None:
        """``on_join.add(hook)``: run ``hook`` before the engine folds into, reads, swaps or saves the average.

        A background export registers its own join here, so a checkpoint save (``state_dict``) or the
        next fold waits for the writer (and sees its failure).
        """
        self.on_join.add(hook)

    # ------------------------------------------------------------------ driven from outside
    def drive_externally(self, param_source: Callable[[], list[list[torch.Tensor]]]) -> None:
        """Stop counting the optimizer's own ``step`` calls: the owner calls `on_step` once per real step.

        Needed where a wrapper steps the optimizer several times per training step (DeepSpeed ZeRO
        steps its base optimizer once per parameter group or sub-group). ``param_source`` returns
        the lists of tensors to average (the fp32 master partitions).
        """
        self._step_hook.remove()
        self._param_source = param_source
        self._groups = None

    def on_step(self) -> None:
        """Count one real optimizer step and sample when due (what the step hook does)."""
        self._after_step(self.optimizer, (), {})

    @property
    def layout_key(self) -> tuple[int, ...] | None:
        """The identity of the average's tensors as laid out now (None before the first step allocates them).

        It changes when they are replaced (a checkpoint load): adapters that link to them relink then.
        """
        return None if self._groups is None else tuple(id(a) for group in self._groups for a in group.avgs)

    # ------------------------------------------------------------------ the hot path
    def _before_step(self, optimizer, args, kwargs) -> None:
        # The parameters may still be copied to pinned memory: the update must not overwrite them before that.
        self._offload.wait_for_copy()

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._groups is None:
            # Allocate at the first step, beside the optimizer's own state: a sharded checkpoint loader
            # (DCP under FSDP2) only restores state keys that already exist in the live optimizer.
            self._param_groups()
        step = self._counters.count_step()
        if self.config.is_sample_step(step):
            self.sample(step)

    @torch.no_grad()
    def sample(self, step: int | None = None) -> None:
        """Fold the current parameters into the average (called by the step hook)."""
        step = self.step if step is None else step
        k = self.num_samples + 1
        steps = [*self._counters.sample_steps(), step] if self.rule.rule.step_aware else None
        coefficient = self.rule.coefficient(k, self.config.fused_num, steps)
        finish = self.rule.finish_factors(k, steps) if k >= self.config.fused_num else []
        self._store.adopt_stepped()
        self._fold(coefficient, start=k == 1, finish=finish)
        self._counters.add_sample(step)
        if self.config.is_stored_step(step):
            self.on_sample.run(self, step)  # before a write-back changes the live weights
        self.on_fold.run(self, step)
        if k >= self.config.fused_num:
            self._end_cycle(step)

    def _fold(self, c: float, start: bool = False, finish: list[float] | None = None) -> None:
        """Fold the parameters in with ``c``; ``start``/``finish``: the anchors' work (`slots.fold_sample`)."""
        self.join()
        for group in self._param_groups():
            if group.staging is not None:
                self._offload.fold(group, c, start, finish)
            else:
                group.fold(group.lparams, c, start, finish)

    def join(self) -> None:
        """Wait for an asynchronous fold and the ``on_join`` hooks: before anything reads or writes the average."""
        self._offload.join()
        self.on_join.run()

    def _end_cycle(self, step: int) -> None:
        self.join()
        self._counters.mark_merged()
        self.on_cycle_end.run(self, step)
        if self.config.write_back:
            self.write_back()
        self._counters.restart_cycle()

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the average into the live parameters (optimizer moments are left as they are)."""
        self._offload.join()  # reads the average only: a background export of it may go on
        for group in self._param_groups():
            torch._foreach_copy_(group.lparams, group.lavgs)

    # ------------------------------------------------------------------ reading the average
    def averages(self) -> dict[torch.Tensor, torch.Tensor]:
        """``{param: fp32 average}`` for every averaged parameter (joins a pending update first).

        Under FSDP2 both are DTensors (the average sharded like the parameter); `pmakit.online.gather`
        gathers them for writing.
        """
        self.join()
        if not self.has_average:
            raise TrainingError("PMA has taken no sample yet, so there is no average to read.")
        return {p: a for group in self._param_groups() for p, a in zip(group.params, group.avgs, strict=True)}

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Put the PMA weights into the live parameters, then restore them bit for bit."""
        self.join()
        if not self.has_average:
            raise TrainingError("PMA has taken no sample yet, so there are no PMA weights to swap in.")
        groups = self._param_groups()
        backups = [[torch.empty_like(p) for p in g.lparams] for g in groups]
        with torch.no_grad():
            for g, backup in zip(groups, backups, strict=True):
                torch._foreach_copy_(backup, g.lparams)
                torch._foreach_copy_(g.lparams, g.lavgs)
        try:
            yield
        finally:
            with torch.no_grad():
                for g, backup in zip(groups, backups, strict=True):
                    torch._foreach_copy_(g.lparams, backup)

    # ------------------------------------------------------------------ state layout
    def _param_groups(self) -> list[SlotGroup]:
        """Averaged parameters grouped by (device, dtype), allocating averages on first use (`layout.build_groups`)."""
        if self._param_source is not None:
            lists = self._param_source()
        else:
            lists = [group["params"] for group in self.optimizer.param_groups]
        signature = (len(lists), tuple(len(g) for g in lists), tuple(id(g[0]) if g else 0 for g in lists))
        if self._groups is None or signature != self._signature:
            self._groups = build_groups(lists, self._store, refill=self.num_samples > 0)
            self._signature = signature
        return self._groups

    # ------------------------------------------------------------------ save and load
    def _before_save(self, optimizer) -> None:
        self.join()
        self._store.adopt_stepped()

    def _after_save(self, optimizer, state_dict: dict) -> dict:
        return self._store.add_pending(state_dict)

    def _before_load(self, optimizer, state_dict: dict) -> dict:
        self.join()
        self._loading_counters = COUNTERS_KEY in (state_dict.get("param_groups") or [{}])[0]
        return self._store.stash(state_dict)

    def _after_load(self, optimizer) -> None:
        self._store.unstash()
        self._groups = None
        if self._counters.stored:
            self._counters.reconcile()
        if not self._loading_counters:  # a checkpoint written without PMA
            self._counters.start_at_optimizer_steps()
