"""DeepSpeed ZeRO stages 1, 2 and 3 on 2 CPU processes (gloo, DeepSpeed's CPU accelerator).

The average follows each rank's fp32 master partition, resumes from DeepSpeed checkpoints,
and the exported model equals the unsharded run. Skipped where DeepSpeed is not installed:
`make test-deepspeed` installs it (`DS_BUILD_OPS=0`, no CUDA ops) and runs these tests and the
`PmaTrainer` ones in `test_trainer_backends.py` (which also holds the CUDA variants).
"""

import importlib.util
import json
import os

import pytest
import torch

from tests.distributed.launch import torchrun
from tests.distributed.reference import unsharded_reference
from tests.helpers.training import load_folder


pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (make test-deepspeed)"
)

STAGES = (1, 2, 3)


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torchrun("ds_worker.py", str(out), ",".join(map(str, STAGES)), timeout=400)
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_zero_average_follows_fp32_partitions(zero_run, stage):
    facts = [json.loads((zero_run / f"zero{stage}" / f"facts_rank{r}.json").read_text()) for r in (0, 1)]
    for f in facts:
        assert f["counters"] == {"step": 6, "count": 0, "sample_steps": [], "cycles": 1, "merged_steps": [2, 4, 6]}
        assert f["flat_fp32"] and f["partition_numel"] < 0.6 * f["model_numel"], "a partition, not a full copy"
        assert f["resume_ok"] and f["state_ok"], "the average is restored from the DeepSpeed checkpoint"
        assert f["refuses_write_back"]
    # The export equals the fp64 weighted sum of the fp32 master weights gathered at the sample steps.
    saved = load_folder(zero_run / f"zero{stage}" / "run" / "pma-6")
    reference = torch.load(zero_run / f"zero{stage}" / "reference.pt")
    assert saved and set(saved) <= set(reference)
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor.double(), reference[name], rtol=1e-6, atol=1e-7, msg=f"ZeRO-{stage} {name}")
    # ... and stays close to plain single-process training (DeepSpeed's reductions round differently).
    unsharded = unsharded_reference()
    worst = max((saved[n] - unsharded[n]).abs().max().item() for n in saved)
    assert worst < 1e-2, worst


@pytest.mark.parametrize("stage", STAGES)
def test_zero_bema_keeps_theta0_beside_the_partitions_and_resumes_it(zero_run, stage):
    facts = [json.loads((zero_run / f"zero{stage}" / f"bema_facts_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(f["theta0_fp32_partition"] and f["resume_ok"] for f in facts), facts
    # The export equals TRL's BEMA (fp64) of the fp32 master weights gathered at the sample steps 2, 4, 6.
    saved = load_folder(zero_run / f"zero{stage}" / "bema" / "pma-6")
    reference = torch.load(zero_run / f"zero{stage}" / "bema_reference.pt")
    assert saved and set(saved) <= set(reference)
    for name, tensor in saved.items():  # theta_0 weighs negative: up to (1 + 2 alpha) times the samples' size
        torch.testing.assert_close(tensor.double(), reference[name], rtol=4e-6, atol=4e-7, msg=f"ZeRO-{stage} {name}")
