"""A small model on a bare optimizer for engine tests: train, sample, and fp64 references of the samples."""

from __future__ import annotations

import torch

from pmakit.online.engine import attach_engine


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dtype)
    return model


def train_step(model, optimizer, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 8, generator=generator).to(next(model.parameters()).dtype)
    loss = model(x).float().pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def snapshot(model):
    return [p.detach().to(torch.float64).clone() for p in model.parameters()]


def weighted_sum(snapshots, weights):
    return [sum(w * s[i] for w, s in zip(weights, snapshots, strict=True)) for i in range(len(snapshots[0]))]


def train_and_sample(config, dtype=torch.float32, steps: int = 11):
    """AdamW with an engine for ``steps`` steps; the fp64 snapshot and step of every sample the config takes."""
    model = make_model(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = attach_engine(optimizer, config)
    snapshots, sample_steps = [], []
    for t in range(1, steps + 1):
        train_step(model, optimizer, seed=t)
        if config.is_sample_step(t):
            snapshots.append(snapshot(model))
            sample_steps.append(t)
    return model, engine, snapshots, sample_steps


class ZeroLike:
    """What the engine reads of a DeepSpeed ZeRO-1/2 optimizer: flat fp32 partitions a torch optimizer steps."""

    def __init__(self, flats: list[torch.Tensor]) -> None:
        self.single_partition_of_fp32_groups = flats
        self.optimizer = torch.optim.AdamW([{"params": [flat]} for flat in flats], lr=1e-2)
        self.overflow = False

    def step(self) -> None:
        for i, flat in enumerate(self.single_partition_of_fp32_groups):
            flat.grad = torch.sin(flat.detach() * (i + 1))
        self.optimizer.step()


def attach_around_load(optimizer, state: dict, attach: str, make):
    """Load ``state`` into ``optimizer``, calling ``make(optimizer)`` (what attaches to it) before or after the load.

    Resume tests run both orders: `PmaTrainer` attaches before the Trainer loads, `PmaCallback` after.
    """
    if attach == "before_load":
        made = make(optimizer)
        optimizer.load_state_dict(state)
        return made
    optimizer.load_state_dict(state)
    return make(optimizer)
