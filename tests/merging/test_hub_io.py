"""Hub inputs and pushes, end to end with the real `huggingface_hub` client against the local Hub server."""

from __future__ import annotations

import pytest
import yaml
from huggingface_hub import HfApi, snapshot_download

from pmakit import HubTarget
from pmakit.cli import main
from pmakit.merging import MergeError, MergeOptions, load_recipe, merge
from tests.helpers.folders import read_folder, save_models


def _upload_models(hub, tmp_path):
    """Two tiny models on the local Hub: alice/m0 on main, alice/m1 on branch `dev` (main holds older weights)."""
    api = HfApi(token=hub.write_token)
    m0, m1, old = save_models(tmp_path / "src", 3, tokenizer=True)
    api.create_repo("m0")
    api.upload_folder(repo_id="alice/m0", folder_path=m0)
    api.create_repo("m1")
    api.upload_folder(repo_id="alice/m1", folder_path=old)
    api.create_branch("alice/m1", branch="dev")
    api.upload_folder(repo_id="alice/m1", folder_path=m1, revision="dev")
    return m0, m1


def test_merge_hub_models_push_and_download_back(local_hub, tmp_path, monkeypatch):
    m0, m1 = _upload_models(local_hub, tmp_path)
    monkeypatch.setenv("HF_TOKEN", local_hub.write_token)  # the token from the environment, never printed
    result = merge(
        ["alice/m0", "alice/m1@dev"],
        tmp_path / "out",
        algo="wma",
        max_shard_size="30KB",
        push_to_hub=HubTarget("alice/merged", private=True, commit_message="PMA merge"),
        cache_dir=tmp_path / "cache",
    )
    # the merge read the Hub copies: the same weights as the local folders, m1 from branch `dev`
    a, b, out = read_folder(m0), read_folder(m1), read_folder(tmp_path / "out")
    assert all(((out[k].double() - (a[k].double() + 2 * b[k].double()) / 3).abs() <= 1e-6).all() for k in out)
    assert result.commit_url.startswith(f"{local_hub.endpoint}/alice/merged/commit/")
    assert local_hub.commits("alice/merged")[0] == "PMA merge" and local_hub.repo("alice/merged").private
    assert local_hub.calls("lfs_upload") >= 2  # the weight shards went through LFS
    card = (tmp_path / "out" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == ["alice/m0", "alice/m1"] and meta["tags"] == ["merge", "pma"]
    assert "alice/m1@dev" in card

    back = snapshot_download("alice/merged", cache_dir=tmp_path / "back")
    local = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    remote = {p.name: p.read_bytes() for p in __import__("pathlib").Path(back).iterdir() if p.name != ".gitattributes"}
    assert remote == local  # model card, recipe, config, tokenizer and every shard, byte for byte


def test_failing_hub_keeps_local_output(local_hub, tmp_path, capsys, monkeypatch):
    folders = save_models(tmp_path, 2)
    monkeypatch.setenv("HF_TOKEN", local_hub.write_token)
    local_hub.fail("preupload", status=503, times=1000)
    code = main(
        ["average", *map(str, folders), "-o", str(tmp_path / "out"), "--push-to-hub", "alice/x", "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 1 and "push failed" in err and "HTTP 503" in err and str(tmp_path / "out") in err
    assert err.count("kept at") == 1  # said once
    assert local_hub.write_token not in err
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "README.md").is_file()

    local_hub.clear_faults()
    local_hub.drop("commit", times=1000)  # dropped connections
    with pytest.raises(Exception, match="local folder is kept") as info:
        merge(folders, tmp_path / "out2", push_to_hub="alice/y")
    assert type(info.value).__name__ == "HubPushError" and (tmp_path / "out2" / "model.safetensors").is_file()


def test_missing_hub_model_is_a_clear_error(local_hub, tmp_path):
    with pytest.raises(MergeError, match="alice/nothing.*not found"):
        merge(["alice/nothing"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_push_command_retries_a_failed_push_with_the_card(local_hub, tmp_path, capsys, monkeypatch):
    folders = save_models(tmp_path, 2)
    monkeypatch.setenv("HF_TOKEN", local_hub.write_token)
    local_hub.fail("preupload", status=503, times=1000)
    argv = ["average", *map(str, folders), "-o", str(tmp_path / "out"), "--push-to-hub", "alice/x", "--no-progress"]
    assert main(argv) == 1
    local_hub.clear_faults()
    code = main(
        ["push", str(tmp_path / "out"), "alice/x", "--private", "--revision", "v1", "--commit-message", "retry"]
    )
    out = capsys.readouterr().out
    assert code == 0 and f"pushed: {local_hub.endpoint}/alice/x/commit/" in out
    assert local_hub.commits("alice/x", revision="v1")[0] == "retry"
    local = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    remote = {k: v for k, v in local_hub.files("alice/x", revision="v1").items() if k != ".gitattributes"}
    assert remote == local
    assert "README.md" in local and "pmakit_recipe.yaml" in local


@pytest.mark.parametrize("argv, message", [(["{tmp}/nope", "alice/x"], "is not a folder"), (["{out}", "bad//id"], "")])
def test_push_command_refuses_bad_input(tmp_path, capsys, argv, message):
    (tmp_path / "out").mkdir()
    argv = [a.format(tmp=tmp_path, out=tmp_path / "out") for a in argv]
    assert main(["push", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pmakit: error: ") and message in err and err.count("\n") == 1


def test_mistyped_local_path_says_both_local_and_hub(local_hub, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["average", "runs/ckpt", "runs/ckpt2", "-o", "out"]) == 2
    err = capsys.readouterr().err
    assert f"Input runs/ckpt is not a local folder (no {tmp_path / 'runs' / 'ckpt'})" in err
    assert "as a Hub id it failed" in err and "not found" in err


def test_merge_old_hub_settings_warn_and_still_push(local_hub, tmp_path, monkeypatch):
    folders = save_models(tmp_path, 2)
    monkeypatch.setenv("HF_TOKEN", local_hub.write_token)
    with pytest.warns(FutureWarning) as record:
        merge(folders, tmp_path / "out", push_to_hub="alice/old", private=True, revision="b1", commit_message="old")
    messages = [str(w.message) for w in record if issubclass(w.category, FutureWarning)]
    assert len(messages) == 3 and all("of MergeOptions is deprecated" in m and "0.2.0" in m for m in messages)
    assert local_hub.commits("alice/old", revision="b1")[0] == "old" and local_hub.repo("alice/old").private


def test_cli_hub_flags_push_one_target_without_a_warning(local_hub, tmp_path, monkeypatch, recwarn):
    folders = save_models(tmp_path, 2)
    monkeypatch.setenv("HF_TOKEN", local_hub.write_token)
    argv = ["average", *map(str, folders), "-o", str(tmp_path / "out"), "--push-to-hub", "alice/flags", "--private"]
    assert main([*argv, "--revision", "b2", "--commit-message", "flags", "--no-progress"]) == 0
    assert local_hub.commits("alice/flags", revision="b2")[0] == "flags" and local_hub.repo("alice/flags").private
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


def test_a_target_and_an_old_hub_setting_together_are_refused(tmp_path):
    with pytest.warns(FutureWarning), pytest.raises(MergeError, match=r"put private=\.\.\. in the HubTarget"):
        MergeOptions(push_to_hub=HubTarget("me/x"), private=True)
    options = MergeOptions(push_to_hub=HubTarget("me/x", revision="v1"))
    with pytest.warns(FutureWarning), pytest.raises(MergeError, match=r"put commit_message=\.\.\. in the HubTarget"):
        merge([tmp_path / "missing"], tmp_path / "out", options=options, commit_message="m")
    assert options.push_to_hub == HubTarget("me/x", revision="v1") and options.revision is None


def test_the_options_token_pushes_when_the_target_has_none():
    assert MergeOptions(push_to_hub="me/x", token="t1").hub_target("msg") == HubTarget(
        "me/x", token="t1", commit_message="msg"
    )
    own = HubTarget("me/x", token="t2", commit_message="mine")
    assert MergeOptions(push_to_hub=own, token="t1").hub_target("msg") == own


def test_recipe_top_level_hub_keys_are_deprecated_and_folded(tmp_path):
    (tmp_path / "r.yaml").write_text("models: [a]\npush_to_hub: me/x\nprivate: true\nrevision: v1\n")
    with pytest.warns(FutureWarning) as record:
        loaded = load_recipe(tmp_path / "r.yaml")
    messages = [str(w.message) for w in record]
    assert "The top-level recipe key `private` is deprecated" in messages[0] and "under `push_to_hub:`" in messages[0]
    assert len(messages) == 2 and "`revision`" in messages[1]
    assert loaded == {"models": ["a"], "push_to_hub": HubTarget("me/x", private=True, revision="v1")}
    (tmp_path / "r.yaml").write_text("models: [a]\npush_to_hub: {repo_id: me/x, private: true}\nprivate: false\n")
    with (
        pytest.warns(FutureWarning),
        pytest.raises(MergeError, match="`private` is given under `push_to_hub:` and at"),
    ):
        load_recipe(tmp_path / "r.yaml")
    (tmp_path / "r.yaml").write_text("models: [a]\npush_to_hub: {repo_id: me/x, private: 'yes'}\n")
    with pytest.raises(MergeError, match="`push_to_hub`: HubTarget `private` must be true or false"):
        load_recipe(tmp_path / "r.yaml")
