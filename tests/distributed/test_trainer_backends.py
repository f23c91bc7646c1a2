"""`PmaTrainer` on Accelerate's sharding backends: DeepSpeed ZeRO (CPU, 2 processes, when
deepspeed is installed) and FSDP2 / ZeRO on CUDA (run on a GPU machine)."""

import importlib.util
import json
import os

import pytest
import torch

from tests.distributed.launch import torchrun
from tests.helpers.training import load_folder


HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs deepspeed (pip install -e '.[deepspeed]')")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def run_worker(tmp_path, mode, nproc, cpu):
    args = [str(tmp_path), mode] + (["cpu"] if cpu else [])
    torchrun("trainer_worker.py", *args, nproc=nproc, timeout=400, cpu=cpu)
    facts = [json.loads((tmp_path / f"facts_rank{r}.json").read_text()) for r in range(nproc)]
    for f in facts:
        assert f["world_size"] == nproc
        assert f["counters"] == {"step": 6, "count": 0, "sample_steps": [], "cycles": 1, "merged_steps": [2, 4, 6]}
        assert f["average_dtypes"] == ["torch.float32"]
        assert f["folders"] == ["checkpoint-3", "checkpoint-6", "pma", "pma-6", "pma-samples"]
        assert f["resume_counters_ok"] and f["resume_exact"], "resume from checkpoint-3 restores the average exactly"
    return facts


def check_zero(facts, folder, nproc):
    for f in facts:
        assert f["deepspeed"] and f["average_types"] == ["Tensor"]
        assert f["average_numel"] <= f["model_numel"] // nproc + 64, "each rank averages its own partition"
    saved = load_folder(folder)  # gathered: full shapes, no empty ZeRO-3 placeholders
    assert saved and all(t.numel() > 1 and t.abs().sum() > 0 for t in saved.values())


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_deepspeed_cpu(tmp_path, stage):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    facts = run_worker(tmp_path, f"zero{stage}", nproc=2, cpu=True)
    check_zero(facts, tmp_path / "run" / "pma-6", 2)
    check_stored_samples(tmp_path / "run")


def check_stored_samples(run):
    """The sample store gathers the live weights: the SMA of the stored samples is the online merge (fp32)."""
    samples = [load_folder(run / "pma-samples" / f"step-{t}") for t in (2, 4, 6)]
    merged = load_folder(run / "pma-6")
    assert samples[0].keys() == merged.keys()
    for name, tensor in merged.items():
        sma = sum(s[name].double() for s in samples) / 3
        torch.testing.assert_close(sma, tensor.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@needs_cuda
def test_trainer_fsdp2_cuda(tmp_path):
    """One process per GPU (NCCL refuses two ranks on one device): world size = min(2, GPUs)."""
    nproc = min(2, torch.cuda.device_count())
    facts = run_worker(tmp_path, "fsdp2", nproc=nproc, cpu=False)
    for f in facts:
        assert f["average_types"] == ["DTensor"] and f["average_numel"] <= f["model_numel"] // nproc + 64
    averages = torch.load(tmp_path / "averages.pt")
    saved = load_folder(tmp_path / "run" / "pma-6")
    assert saved.keys() <= averages.keys()
    for name, tensor in saved.items():  # fp32 weights (bf16 is the compute dtype of FSDP2's mixed precision)
        assert torch.equal(tensor, averages[name].to(tensor.dtype)), name
    live = torch.load(tmp_path / "live.pt")
    sample = load_folder(tmp_path / "run" / "pma-samples" / "step-6")  # gathered from the DTensor shards
    assert sample.keys() == saved.keys()
    for name, tensor in sample.items():
        assert torch.equal(tensor, live[name].to(tensor.dtype)), name


@pytest.mark.cuda
@needs_cuda
@needs_deepspeed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_trainer_deepspeed_cuda(tmp_path, stage):
    nproc = min(2, torch.cuda.device_count())
    facts = run_worker(tmp_path, f"zero{stage}", nproc=nproc, cpu=False)
    check_zero(facts, tmp_path / "run" / "pma-6", nproc)
    check_zero(facts, tmp_path / "run" / "pma-samples" / "step-6", nproc)


@needs_deepspeed
@pytest.mark.parametrize("stage", [1, 2])
def test_trainer_deepspeed_late_first_gradients_cpu(tmp_path, stage):
    """Parameters first used after PMA samples (issue 17, item 4) under ZeRO-1/2 (2 CPU processes).

    ZeRO steps the torch optimizer on flat fp32 partitions that all get a gradient every step (zeros where
    a parameter had none), and the engine allocates the average after that step, so the average always
    sits beside Adam's own state for the partition, never alone. The PMA run must train exactly like the
    plain one, export the fp64 mean of the samples, and resume from checkpoint-3 bit for bit.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torchrun("late_grad_worker.py", str(tmp_path), str(stage), nproc=2, timeout=400, cpu=True)
    for rank in (0, 1):
        facts = json.loads((tmp_path / f"facts_rank{rank}.json").read_text())
        assert facts["deepspeed"] and facts["averages_in_state"] > 0 and not facts["average_alone"]
        assert facts["counters_equal"] and facts["resume_average_exact"], f"rank {rank}: resume is not exact"
    live = torch.load(tmp_path / "live.pt")
    for name, tensor in live["plain"].items():
        assert torch.equal(live["pma"][name], tensor), f"ZeRO-{stage}: PMA changed the training of {name}"
        assert torch.equal(live["resumed"][name], tensor), f"ZeRO-{stage}: the resumed run trained {name} differently"
    samples = torch.load(tmp_path / "samples.pt")
    late = [samples[t]["late_head.weight"] for t in (2, 4, 6)]
    assert not torch.equal(late[1], late[2]), "the late head trains from step 5"
    merged, again = load_folder(tmp_path / "pma" / "pma-6"), load_folder(tmp_path / "resumed" / "pma-6")
    assert set(samples[2]) <= set(merged) and again.keys() == merged.keys()
    for name in samples[2]:
        reference = sum(samples[t][name] for t in (2, 4, 6)) / 3
        torch.testing.assert_close(merged[name].double(), reference, rtol=1e-6, atol=1e-7, msg=f"ZeRO-{stage} {name}")
        assert torch.equal(again[name], merged[name]), name
