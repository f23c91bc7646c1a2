"""DDP: `PmaTrainer` under torchrun on 2 CPU processes (gloo), against a single-process run."""

import torch

from pmakit import PmaTrainer
from tests.distributed.launch import torchrun
from tests.helpers.models import TokenDataset, tiny_llama
from tests.helpers.training import load_folder, pma_args


def test_ddp_two_processes_match_single_process_and_resume(tmp_path):
    torchrun("ddp_worker.py", str(tmp_path))
    full = [torch.load(tmp_path / f"full_rank{r}.pt") for r in (0, 1)]
    resumed = [torch.load(tmp_path / f"resumed_rank{r}.pt") for r in (0, 1)]
    names = list(full[0]["averages"])
    assert names and full[0]["counters"]["step"] == 12 and full[0]["counters"]["cycles"] == 2

    # Identical on every rank, and a resume from checkpoint-6 lands on the same bits.
    for run in (full, resumed):
        for name in names:
            assert torch.equal(run[0]["averages"][name], run[1]["averages"][name]), name
    for name in names:
        assert torch.equal(full[0]["averages"][name], resumed[0]["averages"][name]), name
    assert full[0]["counters"] == resumed[0]["counters"] == resumed[1]["counters"]

    # Only the main process wrote model folders.
    assert not (tmp_path / "writes_rank1.txt").exists()
    written = (tmp_path / "writes_rank0.txt").read_text().split()
    assert {"pma-6", "pma-12", "pma"} <= set(written)
    assert sorted(p.name for p in (tmp_path / "full").glob("pma*")) == ["pma", "pma-12", "pma-6"]
    saved = load_folder(tmp_path / "full" / "pma-12")
    for name in names:
        if name in saved:
            assert torch.equal(saved[name], full[0]["averages"][name]), name
    resumed_saved = load_folder(tmp_path / "resumed" / "pma-12")
    assert all(torch.equal(resumed_saved[k], saved[k]) for k in saved)

    # A single process over the same global batches (2 x 4 = 8 samples per step) gives the same average.
    single = PmaTrainer(
        model=tiny_llama(),
        args=pma_args(tmp_path / "single", max_steps=12, per_device_train_batch_size=8, optim="adamw_torch"),
        train_dataset=TokenDataset(96),
    )
    single.train()
    averages = single.pma_engine.averages()
    reference = {name: averages[p] for name, p in single.model.named_parameters() if p in averages}
    assert set(reference) == set(names)
    worst = max((full[0]["averages"][n] - reference[n]).abs().max().item() for n in names)
    print(f"DDP vs single process: max |difference| of the averages = {worst:.3g}")
    for name in names:
        torch.testing.assert_close(full[0]["averages"][name], reference[name], rtol=1e-4, atol=2e-5, msg=name)
