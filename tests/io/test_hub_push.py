"""`push_folder_to_hub` and `download_model` against the local Hub, including every failure mode."""

from __future__ import annotations

import logging
import os
import traceback
from pathlib import Path

import pytest

from pmakit.errors import InputError
from pmakit.io.hub import HubDownloadError, HubPushError, download_model, push_folder_to_hub


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}\n')
    (folder / "model.safetensors").write_bytes(os.urandom(200_000))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}\n')
    (folder / "README.md").write_text("---\nlibrary_name: transformers\ntags:\n- merge\n- pma\n---\n# Merge\n")
    return folder


def test_push_creates_repo_and_uploads_exactly_the_folder(local_hub, model_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", local_hub.write_token)  # token from the environment
    url = push_folder_to_hub(model_dir, "merged", private=True, commit_message="Add merge")
    repo = local_hub.repo("alice/merged")
    assert url == f"{local_hub.endpoint}/alice/merged/commit/{repo.branches['main']}"
    assert repo.private is True
    files = local_hub.files("alice/merged")
    assert files.pop(".gitattributes")  # written by the Hub when the repo was created, not by us
    assert files == _tree(model_dir)
    assert local_hub.commits("alice/merged") == ["Add merge", "initial commit"]
    assert local_hub.calls("lfs_upload") == 1  # the weights went through LFS


def test_push_to_a_new_branch_and_a_subfolder_with_the_login_token(local_hub, model_dir):
    from huggingface_hub import constants

    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(constants.HF_TOKEN_PATH).write_text(local_hub.write_token)  # as `hf auth login` stores it
    push_folder_to_hub(model_dir, "alice/run", revision="pma-exp", path_in_repo="pma")
    assert set(local_hub.files("alice/run", "main")) == {".gitattributes"}
    on_branch = local_hub.files("alice/run", "pma-exp")
    assert {k[len("pma/") :]: v for k, v in on_branch.items() if k.startswith("pma/")} == _tree(model_dir)
    push_folder_to_hub(model_dir, "alice/run", revision="pma-exp", path_in_repo="pma")  # branch exists: fine
    assert len(local_hub.commits("alice/run", "pma-exp")) == 2  # unchanged files: no new commit


def test_push_as_pull_request(local_hub, model_dir):
    push_folder_to_hub(model_dir, "alice/pr", token=local_hub.write_token)
    (model_dir / "config.json").write_text('{"model_type": "llama", "changed": true}\n')
    url = push_folder_to_hub(model_dir, "alice/pr", token=local_hub.write_token, create_pr=True)
    repo = local_hub.repo("alice/pr")
    assert url.endswith(repo.branches["refs/pr/1"])
    assert local_hub.files("alice/pr", "refs/pr/1")["config.json"] == (model_dir / "config.json").read_bytes()
    assert b"changed" not in local_hub.files("alice/pr", "main")["config.json"]  # main waits for the merge
    with pytest.raises(ValueError, match="create_pr"):
        push_folder_to_hub(model_dir, "alice/pr", token=local_hub.write_token, create_pr=True, revision="dev")


def test_transient_commit_failure_is_retried(local_hub, model_dir, fast_retries):
    local_hub.fail("commit", status=500, times=1)  # the client does not retry commits itself
    push_folder_to_hub(model_dir, "alice/retried", token=local_hub.write_token)
    assert local_hub.calls("commit") == 2 and fast_retries == [2.0]
    assert local_hub.calls("lfs_upload") == 1  # the retry did not upload the weights again
    assert "model.safetensors" in local_hub.files("alice/retried")


FAILURES = {
    "5xx": (lambda hub: hub.fail("preupload", status=503, times=1000), "write", "HTTP 503", 503),
    "dropped": (lambda hub: hub.drop("commit", times=1000), "write", "connection to the Hub failed", None),
    "401": (lambda hub: None, "invalid", "rejected the token (HTTP 401", 401),
    "no-token": (lambda hub: None, None, "no token was found", 401),
    "403": (lambda hub: None, "other", "may not write to alice/target (HTTP 403", 403),
    "404": (lambda hub: hub.fail("lfs_batch", status=404, times=1000), "write", "not found (HTTP 404", 404),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_push_failures_keep_the_folder_and_never_show_the_token(local_hub, model_dir, case, caplog, capsys):
    inject, which, expected, status = FAILURES[case]
    inject(local_hub)
    token = {"write": local_hub.write_token, "other": local_hub.other_token, "invalid": "hf_" + "x" * 32}.get(which)
    before = _tree(model_dir)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(HubPushError) as info:
        push_folder_to_hub(model_dir, "alice/target", token=token)
    err = info.value
    message = str(err)
    assert expected in message, message
    assert "\n" not in message and message.endswith(f"The local folder is kept at {model_dir}.")
    assert err.folder == model_dir and err.status == status
    assert _tree(model_dir) == before  # untouched
    if token:
        shown = "".join(traceback.format_exception(err)) + repr(err) + caplog.text + "".join(capsys.readouterr())
        assert token not in shown and local_hub.write_token not in shown
    if case == "5xx":  # the client retried each preupload, and pmakit retried the whole upload
        assert local_hub.calls("preupload") == 3 * 6


def test_token_echoed_by_the_server_is_scrubbed(local_hub, model_dir):
    token = local_hub.write_token
    local_hub.fail("create_repo", status=400, message=f"Malformed header: Authorization: Bearer {token}")
    with pytest.raises(HubPushError, match=r"HTTP 400 .*Malformed header: Authorization: Bearer \*\*\*") as info:
        push_folder_to_hub(model_dir, "alice/echo", token=token)
    assert token not in "".join(traceback.format_exception(info.value))  # the echoing cause is not chained


def test_push_refuses_bad_input(local_hub, tmp_path, model_dir):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        push_folder_to_hub(tmp_path / "missing", "alice/x", token=local_hub.write_token)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        push_folder_to_hub(tmp_path / "empty", "alice/x", token=local_hub.write_token)
    with pytest.raises(ValueError, match="repo id"):
        push_folder_to_hub(model_dir, "a/b/c", token=local_hub.write_token)
    assert local_hub.calls("create_repo") == 0


@pytest.fixture
def hub_repo(local_hub, tmp_path):
    """A run-like repo: weights and tokenizer at the top, plus files a merge must not fetch."""
    src = tmp_path / "src"
    wanted = {
        "config.json": b"{}",
        "generation_config.json": b"{}",
        "model-00001-of-00002.safetensors": os.urandom(5000),
        "model-00002-of-00002.safetensors": os.urandom(5000),
        "model.safetensors.index.json": b"{}",
        "tokenizer.json": b"{}",
        "tokenizer_config.json": b"{}",
        "special_tokens_map.json": b"{}",
        "tokenizer.model": b"\x00sp",
        "vocab.json": b"{}",
        "merges.txt": b"#",
        "chat_template.jinja": b"{{ x }}",
        "README.md": b"# card\n",
    }
    unwanted = {
        "pytorch_model.bin": b"\x80pickle",
        "optimizer.pt": b"\x80",
        "training_args.bin": b"\x80",
        "pma/model.safetensors": os.urandom(3000),
        "pma/config.json": b'{"pma": 1}',
        "last-checkpoint/model.safetensors": b"x" * 10,
        "notes.txt": b"n",
    }
    for name, data in {**wanted, **unwanted}.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    push_folder_to_hub(src, "alice/run", token=local_hub.write_token, private=True)
    return wanted, unwanted


def test_download_fetches_only_model_files(local_hub, hub_repo, tmp_path):
    wanted, unwanted = hub_repo
    folder = download_model("alice/run", token=local_hub.read_token, cache_dir=tmp_path / "cache")
    assert _tree(folder) == wanted
    pma = download_model("alice/run", token=local_hub.read_token, cache_dir=tmp_path / "cache", subfolder="pma")
    assert pma.name == "pma" and _tree(pma) == {
        "model.safetensors": unwanted["pma/model.safetensors"],
        "config.json": unwanted["pma/config.json"],
    }
    only = download_model(
        "alice/run", token=local_hub.read_token, cache_dir=tmp_path / "c2", allow_patterns=["config.json"]
    )
    assert set(_tree(only)) == {"config.json"}


def test_download_errors_are_clear(local_hub, hub_repo, tmp_path, monkeypatch):
    with pytest.raises(HubDownloadError, match=r"Hub repo alice/nope was not found"):
        download_model("alice/nope", token=local_hub.read_token, cache_dir=tmp_path / "c")
    with pytest.raises(HubDownloadError, match=r"Revision 'v9' was not found in the Hub repo alice/run"):
        download_model("alice/run", revision="v9", token=local_hub.read_token, cache_dir=tmp_path / "c")
    with pytest.raises(HubDownloadError, match="private and the token cannot read it"):  # private, anonymous
        download_model("alice/run", cache_dir=tmp_path / "c")
    with pytest.raises(HubDownloadError, match="no file matches"):
        download_model("alice/run", token=local_hub.read_token, cache_dir=tmp_path / "c", allow_patterns=["*.gguf"])
    local_hub.fail("repo_info", status=503, times=1)
    with pytest.raises(HubDownloadError, match="HTTP 503") as info:
        download_model("alice/run", token=local_hub.read_token, cache_dir=tmp_path / "c3")
    assert local_hub.read_token not in "".join(traceback.format_exception(info.value))


@pytest.mark.parametrize("link", ["file", "folder", "relative"])
def test_push_refuses_a_symlink_that_leaves_the_folder(local_hub, model_dir, tmp_path, monkeypatch, capsys, link):
    from pmakit.cli import main

    secret = tmp_path / "outside"
    secret.mkdir()
    (secret / "id_rsa").write_bytes(b"not for the Hub")
    name, points_to = {
        "file": ("extra.bin", secret / "id_rsa"),
        "folder": ("more", secret),
        "relative": ("sub/notes.txt", Path("../../outside/id_rsa")),
    }[link]
    (model_dir / name).parent.mkdir(exist_ok=True)
    (model_dir / name).symlink_to(points_to)
    with pytest.raises(InputError, match=rf"{name} is a symlink to {secret}.* outside the folder"):
        push_folder_to_hub(model_dir, "alice/leak", token=local_hub.write_token)
    monkeypatch.setenv("HF_TOKEN", local_hub.write_token)
    assert main(["push", str(model_dir), "alice/leak"]) == 2
    assert f"{name} is a symlink to {secret}" in capsys.readouterr().err
    assert local_hub.calls("create_repo") == 0 and local_hub.calls("commit") == 0  # nothing was sent


def test_a_symlink_inside_the_folder_is_uploaded_as_its_target_once(local_hub, model_dir, tmp_path):
    (model_dir / "weights").mkdir()
    (model_dir / "model.safetensors").rename(model_dir / "weights" / "model.safetensors")
    (model_dir / "model.safetensors").symlink_to("weights/model.safetensors")
    (model_dir / "alias").symlink_to("weights", target_is_directory=True)
    push_folder_to_hub(model_dir, "alice/linked", token=local_hub.write_token)
    files = local_hub.files("alice/linked")
    weights = (model_dir / "weights" / "model.safetensors").read_bytes()
    assert files["model.safetensors"] == files["weights/model.safetensors"] == weights  # bytes, not a link
    assert not any(k.startswith("alias/") for k in files)  # a linked folder is not uploaded a second time
    assert sorted(files) == sorted({".gitattributes", *_tree(model_dir)} - {"alias"})  # each path once
    (tmp_path / "elsewhere.safetensors").write_bytes(b"x")
    (model_dir / "weights" / "model.safetensors").unlink()  # the inside link now leads outside
    (model_dir / "weights" / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(InputError, match=r"model.safetensors is a symlink to .*elsewhere.safetensors, outside"):
        push_folder_to_hub(model_dir, "alice/linked", token=local_hub.write_token)
    assert len(local_hub.commits("alice/linked")) == 2  # the refused push sent no commit
