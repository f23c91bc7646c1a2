"""Settings shared by the FSDP2 worker and its single-process reference."""

import torch
from conftest import SEQ, VOCAB

from pmakit import PmaConfig

CONFIG = PmaConfig(fused_algo="wma", fused_num=3, interleave_step=2)
STEPS = 6  # samples after steps 2, 4, 6: one full cycle, exported as pma-6


def batch(step: int) -> torch.Tensor:
    """The global batch (8 sequences) of ``step``; rank r trains on rows 4r..4r+3."""
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randint(1, VOCAB, (8, SEQ), generator=generator)
