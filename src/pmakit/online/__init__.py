"""Online PMA on the optimizer: settings, the engine, fused kernels and sharded backends (torch, no transformers).

The package wires the backend adapters to the engine: they sit above it (each imports the engine,
never the reverse) and `attach_engine` reaches them through `pmakit.online.hooks.BACKENDS`. They are
imported when an engine is attached, so importing the package (e.g. for `PmaConfig`) needs no torch.
"""

from __future__ import annotations

from .hooks import BACKENDS


def _follow_deepspeed(engine, optimizer) -> None:
    """The DeepSpeed ZeRO adapter (`pmakit.online.deepspeed.follow_deepspeed`)."""
    from .deepspeed import follow_deepspeed

    follow_deepspeed(engine, optimizer)


BACKENDS.add(_follow_deepspeed)
