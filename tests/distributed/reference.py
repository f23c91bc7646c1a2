"""Settings and data shared by the sharded workers (FSDP2, DeepSpeed) and their unsharded reference."""

import torch

from pmakit import PmaConfig
from pmakit.online.engine import attach_engine
from tests.helpers.models import SEQ, VOCAB


CONFIG = PmaConfig(fused_algo="wma", fused_num=3, interleave_step=2)
BEMA = PmaConfig(fused_algo="bema", fused_num=3, interleave_step=2)  # theta_0 at step 2; merge at 6
STEPS = 6  # samples after steps 2, 4, 6: one full cycle, exported as pma-6


def batch(step: int) -> torch.Tensor:
    """The global batch (8 sequences) of ``step``; rank r trains on rows 4r..4r+3."""
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randint(1, VOCAB, (8, SEQ), generator=generator)


def unsharded_reference(dtype=torch.float32, config: PmaConfig = CONFIG) -> dict[str, torch.Tensor]:
    """The same training on one process over the full batches: ``{name: fp32 average}``."""
    from tests.helpers.models import tiny_llama

    model = tiny_llama(dtype=dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = attach_engine(optimizer, config)
    for step in range(1, STEPS + 1):
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    averages = engine.averages()
    return {name: averages[p] for name, p in model.named_parameters()}
