"""An online PMA run that pushes to the (local) Hub: the merged model goes with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pmakit import PmaTrainer
from tests.helpers.training import load_folder, pma_args


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run(tmp_path, model_factory, dataset_factory, hub, **overrides):
    args = pma_args(
        tmp_path / "run",
        push_to_hub=True,
        hub_token=hub.write_token,
        hub_strategy="end",
        max_steps=6,
        pma_interleave_step=2,
        pma_fused_num=3,
        **overrides,
    )
    trainer = PmaTrainer(model=model_factory(), args=args, train_dataset=dataset_factory(n=24))
    trainer.train()
    return trainer, tmp_path / "run" / "pma"


def _assert_same_weights(model, folder: Path):
    expected = load_folder(folder)
    state = model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_pma_goes_to_the_pma_subfolder_of_the_run_repo(local_hub, tmp_path, model_factory, dataset_factory):
    trainer, pma = _run(tmp_path, model_factory, dataset_factory, local_hub, hub_model_id="alice/pma-run")
    remote = local_hub.files("alice/pma-run")
    assert {k[len("pma/") :]: v for k, v in remote.items() if k.startswith("pma/")} == _tree(pma)
    assert "PMA merged model (end of training, step 6)" == local_hub.commits("alice/pma-run")[0]
    card = remote["pma/README.md"].decode()
    assert "tags:" in card and "pma" in card and "sample_steps" in card  # its own card, with the recipe

    trainer.push_to_hub()  # the Trainer's own push goes to the same server, beside `pma/`
    assert local_hub.commits("alice/pma-run")[0] == "End of training"
    cache = tmp_path / "cache"
    merged = AutoModelForCausalLM.from_pretrained(
        "alice/pma-run", subfolder="pma", token=local_hub.read_token, cache_dir=cache
    )
    _assert_same_weights(merged, pma)
    live = AutoModelForCausalLM.from_pretrained("alice/pma-run", token=local_hub.read_token, cache_dir=cache)
    _assert_same_weights(live, tmp_path / "run")
    assert not torch.equal(merged.model.norm.weight, live.model.norm.weight)  # PMA weights differ from the live ones


def test_pma_goes_to_its_own_repo_when_named(local_hub, tmp_path, model_factory, dataset_factory):
    _, pma = _run(
        tmp_path,
        model_factory,
        dataset_factory,
        local_hub,
        hub_model_id="alice/run2",
        pma_hub_model_id="pma-org/run2-pma",
        hub_private_repo=True,
    )
    assert set(local_hub.files("alice/run2")) == {".gitattributes"}  # the run's repo is left to the Trainer
    remote = local_hub.files("pma-org/run2-pma")
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == _tree(pma)
    assert local_hub.repo("pma-org/run2-pma").private is True
    merged = AutoModelForCausalLM.from_pretrained(
        "pma-org/run2-pma", token=local_hub.write_token, cache_dir=tmp_path / "cache"
    )
    _assert_same_weights(merged, pma)


def test_push_pma_folder_names_the_run_repo_like_the_trainer(local_hub, tmp_path):
    """Plain Trainer + `PmaCallback` (no trainer handle): the run repo is `hub_model_id`, else the folder name."""
    from types import SimpleNamespace

    from pmakit import PmaConfig
    from pmakit.io.hub import HubPushError
    from pmakit.training.hub import push_pma_folder

    out = tmp_path / "my-run"
    args = SimpleNamespace(
        output_dir=str(out),
        hub_model_id=None,
        hub_token=local_hub.write_token,
        hub_private_repo=None,
        hub_revision="exp",
    )
    assert push_pma_folder(args, PmaConfig()) is None  # nothing to push yet
    (out / "pma").mkdir(parents=True)
    (out / "pma" / "config.json").write_text("{}")
    url = push_pma_folder(args, PmaConfig())
    assert url.startswith(f"{local_hub.endpoint}/alice/my-run/commit/")
    assert local_hub.files("alice/my-run", "exp")["pma/config.json"] == b"{}"
    assert local_hub.commits("alice/my-run", "exp")[0] == "PMA merged model (end of training)"
    local_hub.fail("commit", status=502, times=100)
    with pytest.raises(HubPushError, match=r"HTTP 502 .*The local folder is kept at .*my-run/pma\.$"):
        push_pma_folder(args, PmaConfig(hub_model_id="alice/elsewhere"))
    assert (out / "pma" / "config.json").read_text() == "{}"
