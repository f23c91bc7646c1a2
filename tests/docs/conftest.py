"""Fixtures for the documentation tests: a Hub with the users and organisations the docs name."""

from __future__ import annotations

import secrets

import pytest


@pytest.fixture
def hub_server():
    """A `LocalHub` where `me` may write to its own namespace and to `my-org` and `org` (the docs' names)."""
    from tests.helpers.hub_server import LocalHub

    token = f"hf_{secrets.token_hex(16)}"
    hub = LocalHub({token: ("me", "write")}, orgs={"my-org": {"me"}, "org": {"me"}}).start()
    hub.write_token = token
    hub.user = "me"
    yield hub
    hub.stop()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: the tiny models train about 20x faster on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
