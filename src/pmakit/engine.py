"""The online PMA engine: an fp32 running average kept in the optimizer's own state.

Why the optimizer? Every backend the Trainer supports (single process, DDP, FSDP, DeepSpeed)
already saves and restores optimizer state, and shards it like the parameters, so the
average survives checkpoint/resume for free. The engine hooks the optimizer's ``step``, so
it only sees real updates: gradient-accumulation micro-steps never reach ``step``, and a
step that fp16 overflow skipped never calls it.

Per parameter ``p`` the average is ``optimizer.state[p]["pma_avg"]`` (fp32, allocated at the
first sample). The counters (optimizer steps seen, samples in the current cycle, the steps
they were taken at) sit in ``optimizer.param_groups[0]["pma"]``, which ``load_state_dict``
restores verbatim. ``Optimizer.load_state_dict`` casts floating state to the parameter dtype;
the engine's load hooks keep the average in fp32 (bf16/fp16 models).

A sample folds the parameters into the average with the running form of the averaging law,
``avg <- avg + c_k (x_k - avg)``, as a handful of ``torch._foreach_*`` kernels per
(device, dtype) group: no Python loop over tensors, and nothing at all on steps that take no
sample.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .config import PmaConfig


__all__ = ["PmaEngine", "attach_engine", "unwrap_optimizer"]

logger = logging.getLogger(__name__)

AVG_KEY = "pma_avg"
COUNTERS_KEY = "pma"

CycleHandler = Callable[["PmaEngine", int], None]


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as Accelerate's `AcceleratedOptimizer`."""
    seen = set()
    while hasattr(optimizer, "optimizer") and id(optimizer) not in seen and not hasattr(optimizer, "_pma_engine"):
        seen.add(id(optimizer))
        inner = optimizer.optimizer
        if not isinstance(inner, torch.optim.Optimizer) and not hasattr(inner, "param_groups"):
            break
        optimizer = inner
    return optimizer


def attach_engine(optimizer: torch.optim.Optimizer, config: PmaConfig) -> PmaEngine:
    """The engine on ``optimizer``, attaching a new one if it has none (idempotent)."""
    inner = unwrap_optimizer(optimizer)
    engine = getattr(inner, "_pma_engine", None)
    if engine is None:
        engine = PmaEngine(inner, config)
    elif engine.config != config:
        raise ValueError("This optimizer already carries a PMA engine with different settings.")
    return engine


@dataclass
class _Group:
    """Parameters of one (device, dtype) with their averages: the unit a foreach kernel works on."""

    params: list[torch.Tensor]
    avgs: list[torch.Tensor]
    staging: list[torch.Tensor] | None = None  # pinned CPU copies of CUDA params (offload="cpu")


class PmaEngine:
    """Online PMA on ``optimizer``. Use `attach_engine`, `PmaCallback`, `PmaTrainer` or `create_pma_optimizer`.

    Cycle-end handlers (``add_cycle_handler``) run on every process after the ``fused_num``-th
    sample of a cycle, before the optional write-back; exporters use them to write ``pma-<step>``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: PmaConfig) -> None:
        self.optimizer = optimizer
        self.config = config
        self.rule = config.rule
        self._handlers: list[CycleHandler] = []
        self._groups: list[_Group] | None = None
        self._signature: tuple | None = None
        self._pending: threading.Thread | None = None
        self._pending_error: BaseException | None = None
        self._stream = None
        self._stashed: dict[int, torch.Tensor] = {}
        optimizer._pma_engine = self
        optimizer.register_step_post_hook(self._after_step)
        optimizer.register_load_state_dict_pre_hook(self._before_load)
        optimizer.register_load_state_dict_post_hook(self._after_load)
        optimizer.register_state_dict_pre_hook(lambda _opt: self.join())

    # ------------------------------------------------------------------ counters
    @property
    def counters(self) -> dict:
        """Step, sample and cycle counters, stored in the optimizer so that they resume with it."""
        group = self.optimizer.param_groups[0]
        counters = group.get(COUNTERS_KEY)
        if counters is None:
            counters = group[COUNTERS_KEY] = {"step": 0, "count": 0, "sample_steps": [], "cycles": 0, "merged_steps": []}
        return counters

    @property
    def step(self) -> int:
        """Real optimizer steps seen so far."""
        return self.counters["step"]

    @property
    def num_samples(self) -> int:
        """Samples folded into the current cycle."""
        return self.counters["count"]

    @property
    def num_cycles(self) -> int:
        return self.counters["cycles"]

    @property
    def has_average(self) -> bool:
        """Whether the average holds anything (a sample this cycle, or the merge of the last cycle)."""
        return self.counters["count"] > 0 or self.counters["cycles"] > 0

    def add_cycle_handler(self, handler: CycleHandler) -> None:
        if handler not in self._handlers:
            self._handlers.append(handler)

    # ------------------------------------------------------------------ the hot path
    def _after_step(self, optimizer, args, kwargs) -> None:
        counters = self.counters
        counters["step"] += 1
        step = counters["step"]
        if not self.config.is_sample_step(step):
            return
        self.sample(step)

    @torch.no_grad()
    def sample(self, step: int | None = None) -> None:
        """Fold the current parameters into the average (called by the step hook)."""
        counters = self.counters
        step = counters["step"] if step is None else step
        k = counters["count"] + 1
        coefficient = self.rule.coefficient(k)
        self._fold(coefficient)
        counters["count"] = k
        counters["sample_steps"] = [*counters["sample_steps"], step]
        if k == self.config.fused_num:
            self._end_cycle(step)

    def _fold(self, c: float) -> None:
        self.join()
        for group in self._param_groups():
            if group.staging is not None:
                self._fold_offloaded(group, c)
            else:
                _fold_into(group.avgs, group.params, c)

    def _fold_offloaded(self, group: _Group, c: float) -> None:
        """CUDA params, CPU average: copy on a side stream into pinned memory, fold on a CPU thread."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=group.params[0].device)
        self._stream.wait_stream(torch.cuda.current_stream(group.params[0].device))
        with torch.cuda.stream(self._stream):
            torch._foreach_copy_(group.staging, group.params, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)

        def work() -> None:
            try:
                event.synchronize()
                _fold_into(group.avgs, group.staging, c)
            except BaseException as err:  # surfaced by join()
                self._pending_error = err

        self._pending = threading.Thread(target=work, name="pma-fold", daemon=True)
        self._pending.start()

    def join(self) -> None:
        """Wait for an asynchronous fold; call before anything reads the average."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._pending_error is not None:
            err, self._pending_error = self._pending_error, None
            raise RuntimeError("PMA: the asynchronous update of the average failed.") from err

    def _end_cycle(self, step: int) -> None:
        self.join()
        counters = self.counters
        counters["merged_steps"] = list(counters["sample_steps"])
        for handler in list(self._handlers):
            handler(self, step)
        if self.config.write_back:
            self.write_back()
        counters["cycles"] += 1
        counters["count"] = 0
        counters["sample_steps"] = []

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the average into the live parameters (optimizer moments are left as they are)."""
        self.join()
        for group in self._param_groups():
            torch._foreach_copy_(group.params, group.avgs)

    # ------------------------------------------------------------------ reading the average
    def averages(self) -> dict[torch.Tensor, torch.Tensor]:
        """``{param: fp32 average}`` for every averaged parameter (joins a pending update first)."""
        self.join()
        if not self.has_average:
            raise RuntimeError("PMA has taken no sample yet, so there is no average to read.")
        return {p: a for group in self._param_groups() for p, a in zip(group.params, group.avgs)}

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Put the PMA weights into the live parameters, then restore them bit for bit."""
        self.join()
        if not self.has_average:
            raise RuntimeError("PMA has taken no sample yet, so there are no PMA weights to swap in.")
        groups = self._param_groups()
        backups = [[torch.empty_like(p) for p in g.params] for g in groups]
        with torch.no_grad():
            for g, backup in zip(groups, backups):
                torch._foreach_copy_(backup, g.params)
                torch._foreach_copy_(g.params, g.avgs)
        try:
            yield
        finally:
            with torch.no_grad():
                for g, backup in zip(groups, backups):
                    torch._foreach_copy_(g.params, backup)

    # ------------------------------------------------------------------ state layout
    def _param_groups(self) -> list[_Group]:
        """Averaged parameters grouped by (device, dtype), allocating averages on first use."""
        groups = self.optimizer.param_groups
        signature = (len(groups), tuple(len(g["params"]) for g in groups), id(groups[0]["params"]))
        if self._groups is not None and signature == self._signature:
            return self._groups
        by_key: dict[tuple, _Group] = {}
        offload = self.config.offload == "cpu"
        for group in groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                avg = self._average_for(p, offload)
                key = (p.device, p.dtype)
                entry = by_key.setdefault(key, _Group([], []))
                entry.params.append(p)
                entry.avgs.append(avg)
        for (device, _dtype), entry in by_key.items():
            if offload and device.type == "cuda":
                entry.staging = [torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for p in entry.params]
        self._groups, self._signature = list(by_key.values()), signature
        return self._groups

    def _average_for(self, p: torch.Tensor, offload: bool) -> torch.Tensor:
        state = self.optimizer.state[p]
        avg = state.get(AVG_KEY)
        device = torch.device("cpu") if offload else p.device
        if avg is None:
            if offload and p.device.type == "cuda":
                avg = torch.zeros(p.shape, dtype=torch.float32, device=device, pin_memory=True)
            else:
                avg = torch.zeros_like(p, dtype=torch.float32, device=device)
            state[AVG_KEY] = avg
        elif avg.dtype != torch.float32 or avg.device != device:
            avg = avg.to(device=device, dtype=torch.float32)
            if offload and p.device.type == "cuda":
                avg = avg.pin_memory()
            state[AVG_KEY] = avg
        return avg

    # ------------------------------------------------------------------ load guard
    def _before_load(self, optimizer, state_dict: dict) -> dict:
        """Set the fp32 averages aside before `load_state_dict` casts them to the parameter dtype."""
        self.join()
        self._stashed = {}
        for index, entry in state_dict.get("state", {}).items():
            if isinstance(entry, dict) and AVG_KEY in entry:
                self._stashed[index] = entry[AVG_KEY]
        return state_dict

    def _after_load(self, optimizer) -> None:
        """Put the stashed fp32 averages back in place of the cast copies."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        offload = self.config.offload == "cpu"
        for index, avg in self._stashed.items():
            if isinstance(index, int) and index < len(params):
                p = params[index]
                device = torch.device("cpu") if offload else p.device
                restored = avg.to(device=device, dtype=torch.float32)
                if offload and p.device.type == "cuda":
                    restored = restored.pin_memory()
                optimizer.state[p][AVG_KEY] = restored
        self._stashed = {}
        self._groups = None


def _fold_into(avgs: list[torch.Tensor], samples: list[torch.Tensor], c: float) -> None:
    """``avg <- avg + c (x - avg)`` over a list; ``c == 1`` starts a new average (a plain copy)."""
    if c == 1.0:
        torch._foreach_copy_(avgs, samples)
    elif samples[0].dtype == avgs[0].dtype:
        torch._foreach_lerp_(avgs, samples, c)
    else:  # low-precision samples: lerp needs equal dtypes, mul+add promotes without a temporary copy
        torch._foreach_mul_(avgs, 1.0 - c)
        torch._foreach_add_(avgs, samples, alpha=c)
