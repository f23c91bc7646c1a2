"""FSDP2 (`fully_shard`, DTensor shards) on 2 CPU processes (gloo): the engine keeps one fp32 shard
per rank, exports gather on rank 0, DCP resume is exact; compared with an unsharded run."""

import json

import pytest
import torch

from tests.distributed.launch import torchrun
from tests.distributed.reference import BEMA, unsharded_reference
from tests.helpers.training import load_folder


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    torchrun("fsdp2_worker.py", str(out), "float32,bfloat16")
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fsdp2_average_is_sharded_gathered_and_resumed(fsdp2_run, dtype):
    out = fsdp2_run / dtype
    facts = [json.loads((out / f"facts_rank{r}.json").read_text()) for r in (0, 1)]
    for f in facts:
        assert f["all_dtensor"], "every average is an fp32 DTensor sharded like its parameter"
        assert f["local_avg_numel"] == f["local_param_numel"] < 0.6 * f["full_numel"], "no full copy on a rank"
        assert f["swap_ok"] and f["restore_ok"]
        assert f["resume_ok"], "DCP save/load of the sharded optimizer state restores the fp32 average bit for bit"
    assert sum(f["local_avg_numel"] for f in facts) == facts[0]["full_numel"]

    gathered = [torch.load(out / f"averages_rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(gathered[0][k], gathered[1][k]) for k in gathered[0])
    assert sorted(p.name for p in (out / "run").iterdir()) == ["pma", "pma-6"]
    saved = load_folder(out / "run" / "pma-6")
    for name, tensor in saved.items():
        assert tensor.dtype == getattr(torch, dtype)
        assert torch.equal(tensor, gathered[0][name].to(tensor.dtype)), name


def test_fsdp2_average_matches_unsharded_run(fsdp2_run):
    gathered = torch.load(fsdp2_run / "float32" / "averages_rank0.pt")
    reference = unsharded_reference(torch.float32)
    assert set(gathered) == set(reference)
    worst = max((gathered[n] - reference[n]).abs().max().item() for n in reference)
    print(f"FSDP2 vs unsharded: max |difference| of the averages = {worst:.3g}")
    for name, ref in reference.items():
        torch.testing.assert_close(gathered[name], ref, rtol=1e-4, atol=2e-5, msg=name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fsdp2_bema_resumes_theta0_through_dcp_bitwise(fsdp2_run, dtype):
    assert all(json.loads((fsdp2_run / dtype / f"bema_facts_rank{r}.json").read_text())["resume_ok"] for r in (0, 1))


def test_fsdp2_bema_merge_matches_unsharded_run(fsdp2_run):
    gathered = torch.load(fsdp2_run / "float32" / "bema_averages_rank0.pt")
    for name, ref in unsharded_reference(torch.float32, BEMA).items():
        torch.testing.assert_close(gathered[name], ref, rtol=1e-4, atol=2e-5, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["cuda"])
def test_fsdp2_engine_on_cuda(tmp_path, mode):
    """NCCL, one process per GPU (world size min(2, GPUs))."""
    nproc = min(2, torch.cuda.device_count())
    torchrun("fsdp2_worker.py", str(tmp_path), "bfloat16", mode, nproc=nproc, cpu=False, timeout=300)
    out = tmp_path / "bfloat16"
    for r in range(nproc):
        f = json.loads((out / f"facts_rank{r}.json").read_text())
        assert f["all_dtensor"] and f["swap_ok"] and f["restore_ok"] and f["resume_ok"], f
        assert f["avg_devices"] == ["cuda"]
    gathered = torch.load(out / "averages_rank0.pt")
    saved = load_folder(out / "run" / "pma-6")
    assert saved and all(torch.equal(t, gathered[n].to(t.dtype)) for n, t in saved.items())
