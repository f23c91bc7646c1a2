"""Merge schedules under DDP (2 CPU processes, gloo): replicated windows, evaluation, and a bitwise resume."""

import json

import torch

from tests.distributed.launch import torchrun
from tests.helpers.training import load_folder, pma_folders


def test_ddp_windows_are_replicated_and_resume_bitwise(tmp_path):
    torchrun("schedule_worker.py", str(tmp_path), timeout=400)
    facts = [json.loads((tmp_path / f"facts_rank{r}.json").read_text()) for r in (0, 1)]
    for f in facts:  # every rank evaluated every merge (the evaluation is collective)
        assert f["world"] == 2
        assert {"eval_pma_8_loss", "eval_pma_10_loss", "eval_pma_12_loss"} <= set(f["eval_keys"])
    windows = [torch.load(tmp_path / f"windows_rank{r}.pt") for r in (0, 1)]
    assert sorted(windows[0]) == ["10", "8"]  # at step 7 the windows ending at 8 and 10 are open
    for end, tensors in windows[0].items():  # rank 1 holds the same bits (rank 0's copy is saved)
        assert all(torch.equal(t, windows[1][end][i]) for i, t in tensors.items()), end
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert pma_folders(straight) == pma_folders(resumed) == ["pma-8", "pma-10", "pma-12"]
    for name in pma_folders(straight):
        got, want = load_folder(resumed / name), load_folder(straight / name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), name
