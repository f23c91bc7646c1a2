"""The one reading of ``push_to_hub`` (`as_hub_target`): repo ids, targets, the deprecated separate settings."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from pmakit import HubTarget, InputError, push_folder_to_hub
from pmakit.io.hub_target import as_hub_target, hub_target_of


def _quiet(push_to_hub, **kwargs):
    """as_hub_target, failing on any warning (the new spellings never warn)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return as_hub_target(push_to_hub, where="api", **kwargs)


def test_a_repo_id_or_a_target_is_the_new_shape():
    assert _quiet(None) is None and _quiet(False) is None
    assert _quiet("me/model") == HubTarget("me/model")
    assert _quiet(Path("model")) == HubTarget("model")
    target = HubTarget("me/model", private=True, revision="v1", token="hf_x")
    assert _quiet(target) is target
    assert _quiet(None, private=None, token=None) is None  # deprecated settings left at None are not given


def test_the_default_message_fills_only_an_empty_commit_message():
    assert _quiet("me/m", default_message="merged").commit_message == "merged"
    assert _quiet(HubTarget("me/m", commit_message="mine"), default_message="merged").commit_message == "mine"
    assert _quiet(HubTarget("me/m"), default_message="merged") == HubTarget("me/m", commit_message="merged")


def test_each_deprecated_setting_warns_names_the_new_spelling_and_is_folded_in():
    values = {"private": True, "revision": "v1", "commit_message": "hi", "token": "hf_secret"}
    for name, value in values.items():
        with pytest.warns(
            FutureWarning, match=rf"`{name}=` of api is deprecated .* 0\.2\.0; .*HubTarget\(repo_id, {name}"
        ):
            target = as_hub_target("me/m", where="api", **{name: value})
        assert getattr(target, name) == value and target.repo_id == "me/m"
    with pytest.warns(FutureWarning) as record:
        target = as_hub_target("me/m", where="api", **values)
    assert len(record) == 4 and target == HubTarget("me/m", **values)
    assert all("hf_secret" not in str(w.message) for w in record)  # the token's value is never shown
    with pytest.warns(FutureWarning, match="`private=`"):
        assert as_hub_target(None, where="api", private=True) is None  # no push: warned, nothing to fold into


def test_a_target_and_a_separate_setting_together_are_refused():
    with pytest.warns(FutureWarning), pytest.raises(InputError, match=r"api: put private=\.\.\. in the HubTarget"):
        as_hub_target(HubTarget("me/m"), where="api", private=True)
    with pytest.raises(InputError, match="push_folder_to_hub: put token=..., create_pr=... in the HubTarget"):
        hub_target_of(HubTarget("me/m"), where="push_folder_to_hub", token="t", create_pr=True)


def test_true_is_deprecated_where_the_api_took_a_bool_and_refused_elsewhere():
    with pytest.warns(FutureWarning, match=r"`push_to_hub=True` of api is deprecated.*push_to_hub='namespace/name'"):
        assert as_hub_target(True, where="api", repo_for_true=lambda: "me/run") == HubTarget("me/run")
    with pytest.raises(InputError, match="api: `push_to_hub` takes a repo id or a HubTarget, not True"):
        as_hub_target(True, where="api")


@pytest.mark.parametrize("value", [3, 1.5, ["me/m"], {"repo_id": "me/m"}])
def test_other_values_are_refused(value):
    with pytest.raises(InputError, match="takes a repo id or a HubTarget"):
        as_hub_target(value, where="api")


def test_bad_repo_ids_and_setting_types_fail_when_the_target_is_built():
    with pytest.raises(InputError, match="Hub repo id must be"):
        as_hub_target("a/b/c", where="api")
    with pytest.raises(InputError, match="HubTarget `private` must be true or false, got a str"):
        HubTarget("me/m", private="yes")
    with pytest.raises(InputError, match="HubTarget `token` must be a string, got a int") as e:
        HubTarget("me/m", token=12345)
    assert "12345" not in str(e.value)  # a token's value is never shown, even a wrong one


def test_push_folder_to_hub_refuses_a_target_with_keywords_before_any_request(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match=r"push_folder_to_hub: put private=\.\.\. in the HubTarget"):
        push_folder_to_hub(tmp_path, HubTarget("me/m"), private=True)  # used to ignore `private` silently
