"""The optimizer route's end of training: `finish_pma` / `PmaAdamW.pma_finish` in a plain training loop."""

from pathlib import Path

import pytest
import torch

from pmakit import HubTarget, PmaAdamW, create_pma_optimizer, finish_pma
from tests.helpers.models import TokenDataset, tiny_llama
from tests.helpers.training import load_folder


def _loop(model, optimizer, steps):
    """A hand-written loop; returns fp64 snapshots of the weights after every step (the reference)."""
    data = TokenDataset(4 * steps)
    snapshots = {}
    for step in range(1, steps + 1):
        ids = data.ids[4 * (step - 1) : 4 * step]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        snapshots[step] = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    return snapshots


def test_pma_finish_writes_the_partial_last_cycle(tmp_path):
    model = tiny_llama()
    optimizer = PmaAdamW(
        model.parameters(), lr=1e-2, pma={"interleave_step": 2, "fused_num": 5}, pma_model=model, output_dir=tmp_path
    )
    snapshots = _loop(model, optimizer, 7)  # samples at 2, 4, 6: no cycle completes
    assert not (tmp_path / "pma").exists()
    with pytest.warns(UserWarning, match="no cycle completed"):
        folder = optimizer.pma_finish()
    assert folder == tmp_path / "pma"
    saved = load_folder(folder)
    for name in saved:
        reference = sum(snapshots[s][name] for s in (2, 4, 6)) / 3
        torch.testing.assert_close(saved[name].double(), reference, rtol=2e-6, atol=2e-6, msg=name)
    card = (folder / "README.md").read_text()
    assert "2, 4, 6" in card


def test_finish_after_a_completed_cycle_keeps_the_merge(tmp_path):
    model = tiny_llama()
    optimizer, _ = create_pma_optimizer(model, {"interleave_step": 1, "fused_num": 2}, output_dir=tmp_path, lr=1e-2)
    _loop(model, optimizer, 3)  # the cycle of steps 1-2 is written; step 3 starts another
    before = load_folder(tmp_path / "pma")
    assert finish_pma(optimizer) == tmp_path / "pma"
    after = load_folder(tmp_path / "pma")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_finish_pushes_when_asked(local_hub, tmp_path):
    model = tiny_llama()
    optimizer = PmaAdamW(
        model.parameters(), lr=1e-2, pma={"interleave_step": 1, "fused_num": 3}, pma_model=model, output_dir=tmp_path
    )
    _loop(model, optimizer, 2)
    with pytest.warns(UserWarning, match="no cycle completed"):
        folder = finish_pma(optimizer, push_to_hub=HubTarget("alice/loop-pma", token=local_hub.write_token))
    remote = local_hub.files("alice/loop-pma")
    local = {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == local  # the Hub adds .gitattributes
    assert local_hub.commits("alice/loop-pma")[0] == "PMA merged model (end of training, step 2)"


def test_finish_needs_an_exporter_and_a_repo(tmp_path):
    model = tiny_llama()
    bare = PmaAdamW(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="writes no PMA folders"):
        bare.pma_finish()
    exporting = PmaAdamW(model.parameters(), lr=1e-2, pma_model=model, output_dir=tmp_path)
    with (
        pytest.raises(ValueError, match="needs `hub_model_id`"),
        pytest.warns(FutureWarning, match="push_to_hub=True"),
    ):
        exporting.pma_finish(push_to_hub=True)
    with pytest.raises(ValueError, match="writes no PMA folders"):
        finish_pma(torch.optim.SGD(model.parameters(), lr=0.1))
