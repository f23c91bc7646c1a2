"""The online PMA engine: an fp32 running average kept in the optimizer's own state.

Why the optimizer? Every backend the Trainer supports (single process, DDP, FSDP, DeepSpeed)
already saves and restores optimizer state, and shards it like the parameters, so the
average survives checkpoint/resume for free. The engine hooks the optimizer's ``step``, so
it only sees real updates: gradient-accumulation micro-steps never reach ``step``, and a
step that fp16 overflow skipped never calls it.

Per parameter ``p`` the average is ``optimizer.state[p]["pma_avg"]`` (fp32, allocated at the
first optimizer step, like the optimizer's own state).

Parameters the optimizer has not stepped yet (no gradient so far: an MoE expert not routed to, an
adapter switched on late, a head used by some losses only) are averaged like every other weight,
from their live value at each sample, but their average is kept *beside* the optimizer state until
the optimizer creates that state: Adam, Adafactor and most others initialise a parameter's state
only while it is empty, and Adam's ``__setstate__`` expects its ``step`` in any non-empty state.
The saved state dict carries those averages in ``param_groups[0]["pma_avg_pending"]`` (keyed by the
parameter's position in the optimizer's order), which a plain ``load_state_dict`` restores verbatim
without showing them to the optimizer; the engine takes them back into its keeping on load (or
when it is attached after the load, as `PmaCallback` is). The counters (optimizer steps seen, samples
in the current cycle, the steps they were taken at) sit in ``optimizer.param_groups[0]["pma"]``,
which ``load_state_dict`` restores verbatim. ``Optimizer.load_state_dict`` casts floating state to the parameter dtype;
the engine's load hooks keep the average in fp32 (bf16/fp16 models).

A rule whose running form keeps anchors (``bema``: ``theta_0``, the cycle's first sample) gets one more
fp32 tensor per parameter and anchor, kept exactly like the average (`pmakit.online.slots`: state key
``pma_bema_theta0``, pending ``pma_bema_theta0_pending``); after the cycle's last sample the rule's
``finish`` corrects the average in place, so that it holds the merge when the cycle-end handlers read it.
Between cycle ends such an average holds the running part only (for ``bema``, the EMA from ``theta_0``).

Resuming with other settings. The counters also record the settings that shape a cycle
(``fused_algo``, ``fused_num``, ``interleave_step``, ``start_step``, and ``ema_alpha`` /
``fused_weights`` where the rule uses them). When a checkpoint is resumed under different
ones, the cycle in progress was taken under rules that no longer hold: its samples are
dropped with a warning that names the old and new values, completed merges (``pma-<step>``
folders) are kept, and fresh cycles start under the new settings at the next sample step.
Other settings (``write_back``, ``eval``, ``offload``, saving) may change freely.

Resuming a checkpoint written without PMA. Its optimizer state has no counters; the step count
then starts from the optimizer's own (Adam's per-parameter ``step``) when it has one, and
`PmaCallback` seeds it from the Trainer's ``global_step`` otherwise, so sample steps and
``pma-<step>`` names follow the real optimizer step, not the steps since PMA was switched on.

A sample folds the parameters into the average with the running form of the averaging law,
``avg <- avg + c_k (x_k - avg)``, as a handful of ``torch._foreach_*`` kernels per
(device, dtype) group: no Python loop over tensors, and nothing at all on steps that take no
sample.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch

from ..errors import InputError
from .config import PmaConfig
from .deepspeed import attach_deepspeed, find_zero_optimizer
from .distributed import is_dtensor, like_dtensor, local_shard, unwrap_optimizer
from .slots import AVG_KEY, fold_sample, is_slot_key, pending_key, pop_pending, slot_keys


__all__ = ["AVG_KEY", "COUNTERS_KEY", "PENDING_KEY", "PmaEngine", "attach_engine"]

logger = logging.getLogger(__name__)

PENDING_KEY = pending_key(AVG_KEY)  # saved averages of parameters without optimizer state: {position: average}
COUNTERS_KEY = "pma"
SETTINGS_KEY = "settings"
_RULES_WITHOUT_ALPHA = ("sma", "wma", "weights")

CycleHandler = Callable[["PmaEngine", int], None]


def attach_engine(optimizer: torch.optim.Optimizer, config: PmaConfig) -> PmaEngine:
    """The engine on ``optimizer``, attaching a new one if it has none (idempotent).

    When a DeepSpeed ZeRO optimizer sits in the wrapper chain, the engine follows its fp32 master
    partitions (`attach_deepspeed`).

    Args:
        optimizer: Any `torch.optim.Optimizer` (or a wrapper around one, such as Accelerate's).
        config: The PMA settings, used when a new engine is attached.

    Returns:
        The optimizer's engine.
    """
    inner = unwrap_optimizer(optimizer)
    engine = getattr(inner, "_pma_engine", None)
    if engine is None:
        engine = PmaEngine(inner, config)
    elif engine.config != config:
        raise InputError("This optimizer already carries a PMA engine with different settings.")
    zero = find_zero_optimizer(optimizer)
    if zero is not None:
        attach_deepspeed(engine, zero)
    return engine


@dataclass
class _Group:
    """Parameters of one (device, dtype) with their averages: the unit a foreach kernel works on.

    ``params``/``avgs`` are what the optimizer holds (DTensors under FSDP2); ``lparams``/``lavgs``
    are their rank-local shards, the plain tensors the kernels run on, so a sharded average is
    never materialised in full.
    """

    params: list[torch.Tensor]
    avgs: list[torch.Tensor]
    lparams: list[torch.Tensor] = field(default_factory=list)
    lavgs: list[torch.Tensor] = field(default_factory=list)
    lanchors: list[list[torch.Tensor]] = field(default_factory=list)  # local shards, one list per anchor of the rule
    staging: list[torch.Tensor] | None = None  # pinned CPU copies of CUDA params (offload="cpu")
    fold_cache: dict = field(default_factory=dict)  # `fold_into`'s plan and scratch for this group


class PmaEngine:
    """Online PMA on ``optimizer``. Use `attach_engine`, `PmaCallback`, `PmaTrainer` or `create_pma_optimizer`.

    Cycle-end handlers (``add_cycle_handler``) run on every process after the ``fused_num``-th
    sample of a cycle, before the optional write-back; exporters use them to write ``pma-<step>``
    (under FSDP2 or ZeRO-3 every process must take part in the export's gather collectives).

    At scale the average has exactly the layout of what the optimizer steps: under DDP a full
    fp32 copy per rank (like the optimizer moments), under FSDP2 one fp32 shard per rank (a DTensor
    whose local shard is folded), under DeepSpeed ZeRO the rank's fp32 master partition
    (see `attach_deepspeed`).

    Args:
        optimizer: The optimizer whose parameters are averaged; the average lives in its state.
        config: The PMA settings.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: PmaConfig) -> None:
        self.optimizer = optimizer
        self.config = config
        self.rule = config.rule
        self._keys = slot_keys(self.rule)  # the tensors kept per parameter: the average, then the rule's anchors
        self._handlers: list[CycleHandler] = []
        self._sample_handlers: list[CycleHandler] = []
        self._fold_handlers: list[CycleHandler] = []
        self._groups: list[_Group] | None = None
        self._signature: tuple | None = None
        self._pending: list[threading.Thread] = []
        self._pending_error: BaseException | None = None
        self._join_hooks: list[Callable[[], None]] = []
        self._stream = None
        self._copied = None  # CUDA event: the offload copy of the parameters has finished
        self._stashed: dict = {}
        # Averages (and anchors) of parameters whose optimizer state is still empty: {param: {key: tensor}}.
        self._unstepped: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        self._loading_counters = True  # whether the state dict being loaded carries PMA counters
        self._param_source: Callable[[], list[list[torch.Tensor]]] | None = None
        self.deepspeed = False  # set by `attach_deepspeed`: the average shadows ZeRO's fp32 partitions
        optimizer._pma_engine = self
        self._step_hook = optimizer.register_step_post_hook(self._after_step)
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_load_state_dict_pre_hook(self._before_load)
        optimizer.register_load_state_dict_post_hook(self._after_load)
        optimizer.register_state_dict_pre_hook(self._before_save)
        optimizer.register_state_dict_post_hook(self._after_save)
        if COUNTERS_KEY in optimizer.param_groups[0]:  # attached after a checkpoint was loaded
            self._reconcile_settings()
        self._take_loaded_pending()

    # ------------------------------------------------------------------ counters
    def _raw_counters(self) -> dict:
        """The counters as stored: scalars only (step lists as "2,4,6"), because sharded loaders
        (DCP under FSDP2) flatten param_groups against the live optimizer's and cannot grow a list."""
        group = self.optimizer.param_groups[0]
        raw = group.get(COUNTERS_KEY)
        if raw is None:
            raw = group[COUNTERS_KEY] = {
                "step": 0, "count": 0, "sample_steps": "", "cycles": 0, "merged_steps": "",
                SETTINGS_KEY: cycle_settings(self.config),
            }  # fmt: skip
        return raw

    def _reconcile_settings(self) -> None:
        """After a checkpoint's counters are restored: end a cycle taken under other settings (module docstring)."""
        raw = self.optimizer.param_groups[0][COUNTERS_KEY]
        current = cycle_settings(self.config)
        stored = raw.get(SETTINGS_KEY)
        if stored == current:
            return
        raw[SETTINGS_KEY] = current
        unknown = stored is None  # a checkpoint written before the settings were recorded
        if raw["count"] == 0 or (unknown and raw["count"] < self.config.fused_num):
            if not unknown:
                logger.info("PMA: resumed between cycles; new cycles use %s (was %s).", current, stored)
            return
        dropped = _split_steps(raw["sample_steps"])
        changed = _describe_change(stored, current) if not unknown else f"settings unknown, now {current}"
        warnings.warn(
            f"PMA: the checkpoint's unfinished cycle was taken under other settings ({changed}). Its "
            f"{len(dropped)} sample(s) at optimizer steps {', '.join(map(str, dropped))} are dropped; completed "
            "merges are kept, and new cycles start under the new settings at the next sample step.",
            UserWarning,
            stacklevel=2,
        )
        raw.update(count=0, sample_steps="", merged_steps="")  # the average holds no merge until the next sample

    def start_counting_at(self, step: int) -> None:
        """Count optimizer steps from ``step`` when nothing was counted yet (a resume from a checkpoint
        written without PMA): step numbers, sample steps and ``pma-<step>`` names then follow the
        Trainer's ``global_step``. Counters restored from a PMA checkpoint are left as they are."""
        raw = self._raw_counters()
        if raw["step"] == 0 and raw["count"] == 0 and raw["cycles"] == 0 and step > 0:
            raw["step"] = int(step)

    @property
    def counters(self) -> dict:
        """Step, sample and cycle counters (a decoded copy); stored in the optimizer so that they resume with it."""
        raw = self._raw_counters()
        return {
            **{key: value for key, value in raw.items() if key != SETTINGS_KEY},
            "sample_steps": _split_steps(raw["sample_steps"]),
            "merged_steps": _split_steps(raw["merged_steps"]),
        }

    @property
    def step(self) -> int:
        """Real optimizer steps seen so far."""
        return self._raw_counters()["step"]

    @property
    def num_samples(self) -> int:
        """Samples folded into the current cycle."""
        return self._raw_counters()["count"]

    @property
    def num_cycles(self) -> int:
        return self._raw_counters()["cycles"]

    @property
    def has_average(self) -> bool:
        """Whether the average holds anything (a sample this cycle, or the merge of the last cycle)."""
        raw = self._raw_counters()
        return raw["count"] > 0 or bool(raw["merged_steps"])

    def add_cycle_handler(self, handler: CycleHandler) -> None:
        if handler not in self._handlers:
            self._handlers.append(handler)

    def add_join_hook(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` whenever the engine joins: before it folds into, reads, swaps or saves the average.

        A background export registers its own join here, so a checkpoint save (``state_dict``) or the
        next fold waits for the writer (and sees its failure).
        """
        if hook not in self._join_hooks:
            self._join_hooks.append(hook)

    def add_sample_handler(self, handler: CycleHandler) -> None:
        """Run ``handler(engine, step)`` after each sample the config stores (`PmaConfig.is_stored_step`).

        It runs on every process (a sharded model is gathered collectively), after the fold and before the
        cycle end, so the live parameters are exactly the sample just folded.
        """
        if handler not in self._sample_handlers:
            self._sample_handlers.append(handler)

    def add_fold_handler(self, handler: CycleHandler) -> None:
        """Run ``handler(engine, step)`` after every sample (e.g. `pmakit.online.schedule.MergeWindows`).

        Like a sample handler, but for every sample: after the fold, before the cycle end.
        """
        if handler not in self._fold_handlers:
            self._fold_handlers.append(handler)

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

    # ------------------------------------------------------------------ the hot path
    def _before_step(self, optimizer, args, kwargs) -> None:
        # The parameters may still be copied to pinned memory on the side stream: the update must not
        # overwrite them before that. A device-side wait, so the host never blocks here.
        if self._copied is not None:
            torch.cuda.current_stream(self._copied_device).wait_event(self._copied)
            self._copied = None

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._groups is None:
            # Allocate at the first step, beside the optimizer's own state: a sharded checkpoint loader
            # (DCP under FSDP2) only restores state keys that already exist in the live optimizer.
            self._param_groups()
        counters = self._raw_counters()
        counters["step"] += 1
        step = counters["step"]
        if not self.config.is_sample_step(step):
            return
        self.sample(step)

    @torch.no_grad()
    def sample(self, step: int | None = None) -> None:
        """Fold the current parameters into the average (called by the step hook)."""
        counters = self._raw_counters()
        step = counters["step"] if step is None else step
        k = counters["count"] + 1
        steps = [*_split_steps(counters["sample_steps"]), step] if self.rule.rule.step_aware else None
        coefficient = self.rule.coefficient(k, self.config.fused_num, steps)
        finish = self.rule.finish(k, steps) if k >= self.config.fused_num else {}
        self._adopt_stepped()
        self._fold(coefficient, start=k == 1, finish=[finish.get(a, 0.0) for a in self.rule.anchors])
        counters["count"] = k
        counters["sample_steps"] = _join_steps([*_split_steps(counters["sample_steps"]), step])
        if self.config.is_stored_step(step):
            for handler in list(self._sample_handlers):  # before a write-back changes the live weights
                handler(self, step)
        for handler in list(self._fold_handlers):
            handler(self, step)
        if k >= self.config.fused_num:
            self._end_cycle(step)

    def _fold(self, c: float, start: bool = False, finish: list[float] | None = None) -> None:
        """Fold the parameters in with ``c``; ``start``/``finish``: the anchors' work (`slots.fold_sample`)."""
        self.join()
        for group in self._param_groups():
            if group.staging is not None:
                self._fold_offloaded(group, c, start, finish)
            else:
                fold_sample(group.lavgs, group.lparams, c, group.fold_cache, group.lanchors, start, finish)

    def _fold_offloaded(self, group: _Group, c: float, start: bool, finish: list[float] | None) -> None:
        """CUDA params, pinned-CPU average: copy on a side stream, fold on a CPU thread.

        The training stream goes on at once; only the next optimizer update waits (on the GPU) for
        the copy, and anything that reads the average calls `join` first.
        """
        device = group.lparams[0].device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        self._stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._stream):
            torch._foreach_copy_(group.staging, group.lparams, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._copied, self._copied_device = event, device

        def work() -> None:
            try:
                event.synchronize()
                fold_sample(group.lavgs, group.staging, c, group.fold_cache, group.lanchors, start, finish)
            except BaseException as err:  # surfaced by join()
                self._pending_error = err

        thread = threading.Thread(target=work, name="pma-fold", daemon=True)
        thread.start()
        self._pending.append(thread)

    def join(self) -> None:
        """Wait for an asynchronous fold and a background export: before anything reads or writes the average."""
        self._join_folds()
        for hook in list(self._join_hooks):
            hook()

    def _join_folds(self) -> None:
        while self._pending:
            self._pending.pop().join()
        if self._pending_error is not None:
            err, self._pending_error = self._pending_error, None
            raise RuntimeError("PMA: the asynchronous update of the average failed.") from err

    def _end_cycle(self, step: int) -> None:
        self.join()
        counters = self._raw_counters()
        counters["merged_steps"] = _join_steps(_split_steps(counters["sample_steps"]))
        for handler in list(self._handlers):
            handler(self, step)
        if self.config.write_back:
            self.write_back()
        counters["cycles"] += 1
        counters["count"] = 0
        counters["sample_steps"] = ""

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the average into the live parameters (optimizer moments are left as they are)."""
        self._join_folds()  # reads the average only: a background export of it may go on
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
            raise RuntimeError("PMA has taken no sample yet, so there is no average to read.")
        return {p: a for group in self._param_groups() for p, a in zip(group.params, group.avgs, strict=True)}

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Put the PMA weights into the live parameters, then restore them bit for bit."""
        self.join()
        if not self.has_average:
            raise RuntimeError("PMA has taken no sample yet, so there are no PMA weights to swap in.")
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
    def _param_lists(self) -> list[list[torch.Tensor]]:
        if self._param_source is not None:
            return self._param_source()
        return [group["params"] for group in self.optimizer.param_groups]

    def _param_groups(self) -> list[_Group]:
        """Averaged parameters grouped by (device, dtype), allocating averages on first use."""
        lists = self._param_lists()
        signature = (len(lists), tuple(len(g) for g in lists), tuple(id(g[0]) if g else 0 for g in lists))
        if self._groups is not None and signature == self._signature:
            return self._groups
        by_key: dict[tuple, _Group] = {}
        offload = self.config.offload == "cpu"
        fresh: list[tuple[torch.Tensor, torch.Tensor]] = []  # (average or anchor, parameter shard) allocated just now
        for params in lists:
            for p in params:
                if not p.requires_grad:
                    continue
                local = local_shard(p)
                slots = []
                for key in self._keys:
                    stored = self._stored(p, key) is not None
                    slots.append(self._slot_for(p, key, offload))
                    if not stored:
                        fresh.append((local_shard(slots[-1]), local))
                entry = by_key.setdefault(
                    (local.device, local.dtype), _Group([], [], lanchors=[[] for _ in slots[1:]])
                )
                entry.params.append(p)
                entry.avgs.append(slots[0])
                entry.lparams.append(local)
                entry.lavgs.append(local_shard(slots[0]))
                for anchors, anchor in zip(entry.lanchors, slots[1:], strict=True):
                    anchors.append(local_shard(anchor))
        for (device, _dtype), entry in by_key.items():
            if offload and device.type == "cuda":
                entry.staging = [torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for p in entry.lparams]
        self._groups, self._signature = list(by_key.values()), signature
        if fresh and self.num_samples > 0:
            self._fill_missing(fresh)
        return self._groups

    @torch.no_grad()
    def _fill_missing(self, fresh: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Samples were taken but some averages did not come back (a loader that dropped them): start
        those from the live weights, the best guess left, rather than from zeros, which would shrink them."""
        count = len({id(local) for _, local in fresh})
        warnings.warn(
            f"PMA: {count} parameter(s) have no stored average although the current cycle holds samples (the "
            "checkpoint loader dropped them?); their average restarts from the live weights.",
            UserWarning,
            stacklevel=3,
        )
        for avg, local in fresh:
            avg.copy_(local)

    def _stored(self, p: torch.Tensor, key: str = AVG_KEY) -> torch.Tensor | None:
        """``p``'s average (or anchor ``key``), in its optimizer state or beside it (None before it is allocated)."""
        state = self.optimizer.state.get(p)
        avg = state.get(key) if state else None
        return self._unstepped.get(p, {}).get(key) if avg is None else avg

    def _slot_for(self, p: torch.Tensor, key: str, offload: bool) -> torch.Tensor:
        avg = self._stored(p, key)
        pinned = offload and local_shard(p).device.type == "cuda"
        if pinned and is_dtensor(p):
            raise InputError(
                "PMA `offload='cpu'` is not supported for FSDP2 (DTensor) parameters on GPU: the average is already "
                "sharded (1/world per rank). To keep it in CPU memory, offload the shards with FSDP2 itself "
                "(`fully_shard(..., offload_policy=CPUOffloadPolicy())`, Accelerate `fsdp_offload_params: true`): "
                "the average then follows the parameters to the CPU."
            )
        device = torch.device("cpu") if offload else local_shard(p).device
        if avg is None:
            avg = _new_average(p, device, pinned)
            self._keep(p, key, avg)
        elif avg.dtype != torch.float32 or local_shard(avg).device != device:
            avg = _moved_average(avg, p, device, pinned)
            self._keep(p, key, avg)
        return avg

    def _keep(self, p: torch.Tensor, key: str, avg: torch.Tensor) -> None:
        """Store ``p``'s average (or anchor) in its optimizer state if the optimizer has created it, else beside it.

        An optimizer that finds a non-empty state takes it for its own (Adam would skip initialising it).
        ZeRO's fp32 partitions are always stepped before the engine allocates, so they always have state.
        """
        state = self.optimizer.state.get(p)
        if self.deepspeed or _has_optimizer_state(state):
            self.optimizer.state[p][key] = avg
            kept = self._unstepped.pop(p, {})
            kept.pop(key, None)
            if kept:
                self._unstepped[p] = kept
        else:
            self._unstepped.setdefault(p, {})[key] = avg

    def _adopt_stepped(self) -> None:
        """Move the averages of parameters the optimizer has stepped since into their optimizer state.

        A loop over those parameters only (none in most models); the tensors stay the same objects, so
        the cached kernel groups stay valid.
        """
        for p in [p for p in self._unstepped if _has_optimizer_state(self.optimizer.state.get(p))]:
            self.optimizer.state[p].update(self._unstepped.pop(p))

    def _flat_params(self) -> list[torch.Tensor]:
        """The optimizer's parameters in its order: the positions used by its state dict."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    # ------------------------------------------------------------------ save and load
    def _before_save(self, optimizer) -> None:
        self.join()
        self._adopt_stepped()

    def _after_save(self, optimizer, state_dict: dict) -> dict:
        """Save the averages of parameters without optimizer state in ``param_groups[0]``, never as their state."""
        if self._unstepped:
            position = {id(p): i for i, p in enumerate(self._flat_params())}
            missing = [p for p in self._unstepped if id(p) not in position]
            if missing:
                raise RuntimeError(f"PMA: {len(missing)} averaged tensor(s) are not parameters of the optimizer.")
            first = state_dict["param_groups"][0] = dict(state_dict["param_groups"][0])
            for key in self._keys:
                first[pending_key(key)] = {
                    position[id(p)]: kept[key] for p, kept in self._unstepped.items() if key in kept
                }
        return state_dict

    def _take_loaded_pending(self) -> None:
        """Take the pending averages that a load without the engine's hooks left in ``param_groups[0]``."""
        pending = pop_pending(self.optimizer.param_groups[0])
        if pending:
            params = self._flat_params()
            self._restore_slots([(params[int(i)], k, t) for k, kept in pending.items() for i, t in kept.items()])

    def _restore_slots(self, loaded: list[tuple[torch.Tensor, str, torch.Tensor]]) -> None:
        """Put loaded averages and anchors in place, in fp32 on the average's device (a load casts and moves state).
        Anchors of another rule are dropped: a cycle resumed under another rule restarts (module docstring)."""
        offload = self.config.offload == "cpu"
        for p, key, avg in loaded:
            if key not in self._keys:
                continue
            pinned = offload and local_shard(p).device.type == "cuda"
            device = torch.device("cpu") if offload else local_shard(p).device
            self._keep(p, key, _moved_average(avg, p, device, pinned, copy=True))
        self._groups = None

    def _before_load(self, optimizer, state_dict: dict) -> dict:
        """Take the fp32 averages out of the state dict before `load_state_dict` casts them to the parameter
        dtype, or shows the optimizer a state it did not create (Adam's ``__setstate__`` wants a ``step``)."""
        self.join()
        self._stashed = {}
        groups = state_dict.get("param_groups") or [{}]
        self._loading_counters = COUNTERS_KEY in groups[0]
        # Map saved ids to live parameters the way `load_state_dict` does: in group order (the ids of a
        # state dict rebuilt by torch.distributed.checkpoint need not be 0..n-1 in that order).
        saved_ids = [i for group in state_dict.get("param_groups", []) for i in group.get("params", [])]
        params = self._flat_params()
        id_map = dict(zip(saved_ids, params, strict=True))
        state = {}
        for index, entry in state_dict.get("state", {}).items():
            if isinstance(entry, dict) and any(is_slot_key(key) for key in entry):
                if index in id_map:
                    slots = {key: value for key, value in entry.items() if is_slot_key(key)}
                    self._stashed.update({(index, key): (id_map[index], key, t) for key, t in slots.items()})
                entry = {key: value for key, value in entry.items() if not is_slot_key(key)}
                if not entry:  # a checkpoint of an older pmakit: the average alone, no optimizer state
                    continue
            state[index] = entry
        first = dict(groups[0])
        for key, pending in pop_pending(first).items():
            for position, avg in pending.items():
                self._stashed[("pending", key, int(position))] = (params[int(position)], key, avg)
        loaded = {**state_dict, "state": state}
        if len(first) != len(groups[0]):
            loaded["param_groups"] = [first, *state_dict["param_groups"][1:]]
        return loaded

    def _after_load(self, optimizer) -> None:
        """Put the stashed fp32 averages back: into the optimizer state where it has one, else beside it."""
        self._unstepped = {}  # the load replaced the whole state
        self._restore_slots(list(self._stashed.values()))
        self._stashed = {}
        if COUNTERS_KEY in optimizer.param_groups[0]:
            self._reconcile_settings()
        if not self._loading_counters:  # a checkpoint written without PMA
            self.start_counting_at(_optimizer_steps(optimizer))


def _has_optimizer_state(state: dict | None) -> bool:
    """Whether the optimizer has created ``state`` (anything there besides the average and anchors)."""
    return bool(state) and any(not is_slot_key(key) for key in state)


def _optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """The steps a restored optimizer has taken by its own count (Adam's per-parameter ``step``), else 0."""
    steps = [entry["step"] for entry in optimizer.state.values() if isinstance(entry, dict) and "step" in entry]
    return max((int(step.item() if torch.is_tensor(step) else step) for step in steps), default=0)


def cycle_settings(config: PmaConfig) -> str:
    """The settings that shape a cycle, as stored with the counters: ``"fused_algo=ema; fused_num=4; ..."``.

    Rule parameters come from the averaging rule itself, so a rule parameter added later is covered
    too (when it differs from its default); ``ema_alpha`` is left out for the rules that do not use it.
    """
    rule = config.rule
    items = {
        "fused_algo": config.fused_algo,
        "fused_num": config.fused_num,
        "interleave_step": config.interleave_step,
        "start_step": config.start_step,
    }
    for f in fields(rule):
        value = getattr(rule, f.name)
        if f.name == "alpha":
            if rule.algo in _RULES_WITHOUT_ALPHA:
                continue
        elif f.name == "algo" or value is None or value == f.default:
            continue
        name = {"alpha": "ema_alpha", "weights": "fused_weights"}.get(f.name, f.name)
        items[name] = list(value) if isinstance(value, tuple) else value
    return "; ".join(f"{key}={value}" for key, value in items.items())


def _describe_change(old: str, new: str) -> str:
    """``"fused_num=4 -> 2, fused_algo=sma -> ema"``: only the settings that differ."""
    before = dict(part.split("=", 1) for part in old.split("; ") if "=" in part)
    after = dict(part.split("=", 1) for part in new.split("; ") if "=" in part)
    keys = [*after, *(k for k in before if k not in after)]
    changed = [k for k in keys if before.get(k) != after.get(k)]
    return ", ".join(f"{k}={before.get(k, '(unset)')} -> {after.get(k, '(unset)')}" for k in changed)


def _new_average(p: torch.Tensor, device: torch.device, pinned: bool) -> torch.Tensor:
    """A zero fp32 average shaped (and, for a DTensor, sharded) like ``p``."""
    if not is_dtensor(p):
        if pinned:
            return torch.zeros(p.shape, dtype=torch.float32, pin_memory=True)
        return torch.zeros_like(p, dtype=torch.float32, device=device)
    return torch.zeros_like(p, dtype=torch.float32)  # same mesh and placements, local shard only


def _moved_average(
    avg: torch.Tensor, p: torch.Tensor, device: torch.device, pinned: bool, copy: bool = False
) -> torch.Tensor:
    """``avg`` as fp32 on ``device`` (pinned when asked), keeping a DTensor's sharding."""
    local = local_shard(avg).to(device=device, dtype=torch.float32, copy=copy)
    if pinned and not local.is_pinned():
        local = local.pin_memory()
    if is_dtensor(p):
        if is_dtensor(avg) and not pinned and local.device == local_shard(p).device:
            return like_dtensor(avg, local)
        return like_dtensor(p, local)
    return local


def _join_steps(steps: list[int]) -> str:
    return ",".join(str(int(t)) for t in steps)


def _split_steps(stored: str | list) -> list[int]:
    if isinstance(stored, (list, tuple)):  # a checkpoint written before steps were stored as text
        return [int(t) for t in stored]
    return [int(t) for t in stored.split(",") if t]
