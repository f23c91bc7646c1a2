"""Shared fixtures: tiny local models and deterministic data (nothing is downloaded)."""

from __future__ import annotations

import os

import pytest

from tests.helpers.models import TokenDataset, tiny_llama


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


@pytest.fixture
def model_factory():
    return tiny_llama


@pytest.fixture
def dataset_factory():
    return TokenDataset


# ------------------------------------------------------------------------------------------------
# A local Hub-compatible server (tests/helpers/hub_server.py) for Hub push/download tests: the real
# `huggingface_hub` client talks HTTP to it on 127.0.0.1; nothing else is reachable.


@pytest.fixture
def hub_server():
    """A started `LocalHub` with users `alice` (write and read tokens) and `bob` (write token)."""
    import secrets

    from tests.helpers.hub_server import LocalHub

    users = [("alice", "write"), ("alice", "read"), ("bob", "write")]
    tokens = {f"hf_{secrets.token_hex(16)}": user for user in users}
    hub = LocalHub(tokens, orgs={"pma-org": {"alice"}}).start()
    (hub.write_token, _), (hub.read_token, _), (hub.other_token, _) = tokens.items()
    hub.user = "alice"
    yield hub
    hub.stop()


@pytest.fixture
def fast_retries(monkeypatch):
    """Record, instead of sleeping, the back-off waits of the Hub client and of `pmakit.io.hub`."""
    import time
    import types

    import huggingface_hub.file_download as file_download
    import huggingface_hub.utils._http as hub_http

    sleeps: list[float] = []
    clock = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
    clock.sleep = sleeps.append
    monkeypatch.setattr(hub_http, "time", clock)
    monkeypatch.setattr(file_download, "time", clock)
    import pmakit.io.hub

    monkeypatch.setattr(pmakit.io.hub, "_sleep", sleeps.append)
    return sleeps


@pytest.fixture
def local_hub(hub_server, fast_retries, monkeypatch, tmp_path):
    """Point `huggingface_hub` (and transformers) at `hub_server`, with an isolated HF_HOME and no token.

    The endpoint, offline and Xet switches are read when `huggingface_hub.constants` is imported, so
    both the environment and the constants are patched (HF_HUB_DISABLE_XET=1 selects the LFS path).
    Every client request is checked to stay on 127.0.0.1.
    """
    import httpx2
    import huggingface_hub.utils._http as hub_http
    import transformers.utils.hub as transformers_hub
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    for name in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_TOKEN_PATH",
        "TRANSFORMERS_OFFLINE",
        "HF_XET_CACHE",
    ):
        monkeypatch.delenv(name, raising=False)
    env = {
        "HF_ENDPOINT": hub_server.endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    values = {
        "ENDPOINT": hub_server.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub_server.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
    }
    for name, value in values.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(transformers_hub, "_hf_api", None)

    def loopback_only(request):
        if request.url.host != "127.0.0.1":
            raise RuntimeError(f"Test tried to reach {request.url.host}; only the local Hub is allowed.")

    def client_factory():
        return httpx2.Client(
            event_hooks={"request": [hub_http.hf_request_event_hook, loopback_only]}, follow_redirects=True, timeout=30
        )

    hub_http.set_client_factory(client_factory)
    try:
        yield hub_server
    finally:
        hub_http.set_client_factory(hub_http.default_client_factory)
