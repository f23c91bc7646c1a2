"""The local Hub server driven by the real `huggingface_hub` client: what we send is what the Hub would get."""

from __future__ import annotations

import hashlib
import os

import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError


def _write_folder(root, files: dict[str, bytes]):
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@pytest.fixture
def folder(tmp_path):
    weights = os.urandom(300_000)
    return _write_folder(
        tmp_path / "model",
        {
            "config.json": b'{"model_type": "llama"}\n',
            "model.safetensors": weights,
            "README.md": b"---\nlibrary_name: transformers\ntags: [merge, pma]\n---\n# A model\n",
            "sub/notes.txt": b"hello\n",
        },
    )


def test_whoami_and_token_refusal(local_hub):
    api = HfApi()
    assert api.whoami(token=local_hub.write_token)["name"] == "alice"
    with pytest.raises(HfHubHTTPError) as err:
        api.whoami(token="hf_not_a_valid_token")
    assert err.value.response.status_code == 401


def test_upload_folder_round_trip_through_lfs(local_hub, folder, tmp_path):
    api = HfApi(token=local_hub.write_token)
    url = api.create_repo("roundtrip")
    assert url.repo_id == "alice/roundtrip"
    info = api.upload_folder(repo_id="alice/roundtrip", folder_path=folder, commit_message="first upload")
    assert info.commit_url.startswith(f"{local_hub.endpoint}/alice/roundtrip/commit/")
    # the weights went through the LFS batch API, basic PUT to storage, and verify; small files inline
    assert [local_hub.calls(e) for e in ("lfs_batch", "lfs_upload", "lfs_verify")] == [1, 1, 1]
    stored = local_hub.repo("alice/roundtrip")
    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() in stored.lfs_oids
    remote = local_hub.files("alice/roundtrip")
    expected = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == expected
    assert local_hub.commits("alice/roundtrip")[0] == "first upload"

    # download back with the client (LFS file redirected to the storage port) and compare bytes
    local = snapshot_download("alice/roundtrip", token=local_hub.write_token, cache_dir=tmp_path / "cache")
    for name, data in expected.items():
        assert (tmp_path / "cache").exists() and open(os.path.join(local, name), "rb").read() == data
    assert local_hub.calls("storage_get") == 1
    # a second identical upload sends no LFS bytes again (the server already has the object)
    api.upload_folder(repo_id="alice/roundtrip", folder_path=folder, commit_message="again")
    assert local_hub.calls("lfs_upload") == 1


def test_branches_and_revisions(local_hub, folder, tmp_path):
    api = HfApi(token=local_hub.write_token)
    api.create_repo("branched")
    api.create_branch("alice/branched", branch="dev")
    api.upload_folder(repo_id="alice/branched", folder_path=folder, revision="dev", commit_message="on dev")
    refs = api.list_repo_refs("alice/branched")
    assert sorted(b.name for b in refs.branches) == ["dev", "main"]
    assert "config.json" in local_hub.files("alice/branched", "dev")
    assert "config.json" not in local_hub.files("alice/branched", "main")
    path = hf_hub_download("alice/branched", "config.json", revision="dev", cache_dir=tmp_path / "c")
    assert open(path, "rb").read() == (folder / "config.json").read_bytes()
    with pytest.raises(RevisionNotFoundError):
        api.repo_info("alice/branched", revision="nope")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch("alice/branched", branch="dev")
    assert err.value.response.status_code == 409
    api.create_branch("alice/branched", branch="dev", exist_ok=True)
    files = {f.path for f in api.list_repo_tree("alice/branched", revision="dev", recursive=True)}
    assert {"config.json", "model.safetensors", "sub", "sub/notes.txt"} <= files
    info = {i.path: i for i in api.get_paths_info("alice/branched", ["model.safetensors", "sub", "x"], revision="dev")}
    assert set(info) == {"model.safetensors", "sub"}
    weights = (folder / "model.safetensors").read_bytes()
    assert info["model.safetensors"].lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert set(api.list_repo_files("alice/branched", revision="dev")) == set(local_hub.files("alice/branched", "dev"))


def test_private_repo_and_permissions(local_hub, folder, tmp_path):
    owner = HfApi(token=local_hub.write_token)
    owner.create_repo("secret", private=True)
    owner.upload_folder(repo_id="alice/secret", folder_path=folder)
    assert owner.repo_info("alice/secret").private is True
    with pytest.raises(RepositoryNotFoundError):  # anonymous: the Hub hides private repos
        HfApi(token=False).repo_info("alice/secret")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/secret", "config.json", token=False, cache_dir=tmp_path / "c")
    with pytest.raises(RepositoryNotFoundError):  # another user
        HfApi(token=local_hub.other_token).repo_info("alice/secret")
    reader = HfApi(token=local_hub.read_token)
    assert reader.repo_info("alice/secret").sha == owner.repo_info("alice/secret").sha
    with pytest.raises(HfHubHTTPError) as err:  # a read token cannot write
        reader.upload_folder(repo_id="alice/secret", folder_path=folder)
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:  # nor can bob write into alice's namespace
        HfApi(token=local_hub.other_token).create_repo("alice/other")
    assert err.value.response.status_code == 403


def test_injected_faults_are_retried_by_the_client(local_hub, folder, fast_retries):
    api = HfApi(token=local_hub.write_token)
    api.create_repo("flaky")
    local_hub.fail("preupload", status=503, times=2)
    local_hub.drop("lfs_upload", times=1)
    api.upload_folder(repo_id="alice/flaky", folder_path=folder)
    assert local_hub.calls("preupload") == 3 and local_hub.calls("lfs_upload") == 2
    assert len(fast_retries) == 3  # the client backed off three times, without sleeping
    assert "model.safetensors" in local_hub.files("alice/flaky")
