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


def _pma_run(tmp_path, pma: dict | None = None):
    """A PmaAdamW with an exporter after two steps (one sample of an unfinished cycle)."""
    model = tiny_llama()
    pma = {"interleave_step": 1, "fused_num": 3, **(pma or {})}
    optimizer = PmaAdamW(model.parameters(), lr=1e-2, pma=pma, pma_model=model, output_dir=tmp_path)
    _loop(model, optimizer, 2)
    return optimizer


@pytest.mark.filterwarnings("ignore:PMA.*no cycle completed:UserWarning")
def test_finish_pushes_to_a_repo_id_without_a_deprecation_warning(local_hub, tmp_path, monkeypatch, recwarn):
    monkeypatch.setenv("HF_TOKEN", local_hub.write_token)
    _pma_run(tmp_path).pma_finish(push_to_hub="alice/by-id")
    assert local_hub.commits("alice/by-id")[0] == "PMA merged model (end of training, step 2)"
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


@pytest.mark.filterwarnings("ignore:PMA.*no cycle completed:UserWarning")
def test_finish_old_spellings_warn_and_still_push(local_hub, tmp_path):
    token = local_hub.write_token
    with pytest.warns(FutureWarning) as record:
        finish_pma(_pma_run(tmp_path / "a"), push_to_hub=True, hub_model_id="alice/old", token=token, private=True)
    messages = " ".join(str(w.message) for w in record if issubclass(w.category, FutureWarning))
    for old in ("`push_to_hub=True`", "`hub_model_id=`", "`token=`", "`private=`"):
        assert f"{old} of finish_pma is deprecated and will be removed in pmakit 0.2.0" in messages
    assert local_hub.repo("alice/old").private and token not in messages
    optimizer = _pma_run(tmp_path / "b", {"hub_model_id": "alice/from-config"})
    with pytest.warns(FutureWarning) as record:
        optimizer.pma_finish(push_to_hub=True, token=token, revision="exp")  # True: the PMA settings' repo
    assert len([w for w in record if issubclass(w.category, FutureWarning)]) == 3
    assert local_hub.commits("alice/from-config", revision="exp")[0].startswith("PMA merged model")


def test_finish_refuses_both_spellings_before_writing(tmp_path):
    optimizer = _pma_run(tmp_path)
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=r"put token=\.\.\. in the HubTarget"):
        finish_pma(optimizer, push_to_hub=HubTarget("alice/x"), token="t")
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="not also `hub_model_id`"):
        finish_pma(optimizer, push_to_hub="alice/x", hub_model_id="alice/y")
    assert not (tmp_path / "pma").exists()
