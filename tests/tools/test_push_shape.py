"""One push shape and one direction name across greedy soup, learned soup, sweep and the FusionBench class.

Each API pushes to the local Hub (tests/helpers/hub_server.py) with ``push_to_hub=`` a repo id or a
`HubTarget`; each old spelling (separate ``private``/``revision``/``commit_message``/``token``,
``push_to_hub=True``, ``higher_is_better``, ``evaluate=``) still works with a FutureWarning; giving both
spellings is refused before any work.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from pmakit import HubTarget, InputError, LearnedSoup, WeightedAverageForLLama, greedy_soup, sweep
from tests.helpers.folders import read_folder, save_models
from tests.helpers.models import tiny_llama


def _total(model) -> float:
    """A score that differs between the candidates: the sum of the weights."""
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def _norm_sum(folder) -> float:
    return float(read_folder(folder)["model.norm.weight"].double().sum())


def _never(*args):
    raise AssertionError("refused settings must fail before any scoring")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return save_models(tmp_path_factory.mktemp("candidates"), 2)


def _pushed(hub, repo: str, revision: str = "main") -> tuple[str, bool]:
    """(the newest commit's message, whether the repo is private)."""
    return hub.commits(repo, revision=revision)[0], hub.repo(repo).private


# ------------------------------------------------------------------------------------------------ greedy soup
def test_greedy_soup_pushes_to_a_target_without_a_warning(folders, tmp_path, local_hub, recwarn):
    target = HubTarget("alice/g-new", private=True, revision="v1", token=local_hub.write_token)
    result = greedy_soup(
        folders, _total, model=tiny_llama(), greater_is_better=True, output_dir=tmp_path / "o", push_to_hub=target
    )
    message, private = _pushed(local_hub, "alice/g-new", "v1")
    assert private and message == f"Greedy soup of {len(result.kept)} of 2 candidates" and result.hub_url
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


def test_greedy_soup_old_spellings_warn_and_still_push(folders, tmp_path, local_hub):
    token = local_hub.write_token
    with pytest.warns(FutureWarning) as record:
        result = greedy_soup(
            folders,
            evaluate=_total,
            model=tiny_llama(),
            greater_is_better=True,
            output_dir=tmp_path / "o",
            push_to_hub="alice/g-old",
            private=True,
            revision="v2",
            commit_message="old spelling",
            token=token,
        )
    messages = " ".join(str(w.message) for w in record)
    for old in ("`evaluate=`", "`private=`", "`revision=`", "`commit_message=`", "`token=`"):
        assert f"{old} of greedy_soup is deprecated and will be removed in pmakit 0.2.0" in messages
    assert token not in messages and result.metric == "score" and result.greater_is_better
    assert _pushed(local_hub, "alice/g-old", "v2") == ("old spelling", True)


def test_greedy_soup_refuses_both_spellings_before_scoring(folders, tmp_path):
    with pytest.raises(InputError, match="give `score` only; `evaluate` is its deprecated name"):
        greedy_soup(folders, _never, evaluate=_never, greater_is_better=True)
    with pytest.warns(FutureWarning), pytest.raises(InputError, match=r"put token=\.\.\. in the HubTarget"):
        greedy_soup(
            folders, _never, greater_is_better=True, output_dir=tmp_path, push_to_hub=HubTarget("a/b"), token="t"
        )


def test_greedy_soup_reads_the_scorers_own_direction(folders):
    class Scorer:
        greater_is_better = True

        def __call__(self, model):
            return _total(model)

    class OldScorer(Scorer):
        greater_is_better = None
        higher_is_better = True

    assert greedy_soup(folders, Scorer(), model=tiny_llama()).greater_is_better is True
    with pytest.warns(FutureWarning, match=r"A scorer's `higher_is_better` \(OldScorer\) is deprecated"):
        assert greedy_soup(folders, OldScorer(), model=tiny_llama()).greater_is_better is True


# ------------------------------------------------------------------------------------------------ learned soup
def _soup() -> LearnedSoup:
    return LearnedSoup([0.5, 0.5], 1.0, dict(tiny_llama(seed=1).state_dict()), ["a", "b"])


def test_learned_soup_pushes_to_a_target_and_refuses_both_spellings(tmp_path, local_hub):
    target = HubTarget("alice/l-new", revision="v1", private=True, token=local_hub.write_token)
    _soup().save(tiny_llama(), tmp_path / "new", push_to_hub=target)
    assert _pushed(local_hub, "alice/l-new", "v1") == ("Upload learned soup (pmakit)", True)
    with pytest.warns(FutureWarning), pytest.raises(InputError, match=r"put private=\.\.\. in the HubTarget"):
        _soup().save(tiny_llama(), tmp_path / "both", push_to_hub=target, private=True)
    assert not (tmp_path / "both").exists()  # refused before the folder is written


def test_learned_soup_old_spellings_warn_and_still_push(tmp_path, local_hub):
    with pytest.warns(FutureWarning) as record:
        _soup().save(
            tiny_llama(),
            tmp_path / "old",
            push_to_hub="l-old",
            private=True,
            revision="v2",
            commit_message="old spelling",
            token=local_hub.write_token,
        )
    ours = [str(w.message) for w in record if issubclass(w.category, FutureWarning)]
    assert len(ours) == 4 and all("of LearnedSoup.save is deprecated" in message for message in ours)
    assert _pushed(local_hub, "alice/l-old", "v2") == ("old spelling", True)


# ------------------------------------------------------------------------------------------------ sweep
def test_sweep_pushes_to_a_target_and_reads_the_scorers_direction(folders, tmp_path, local_hub, recwarn):
    class Scorer:
        greater_is_better = True

        def __call__(self, folder):
            return _norm_sum(folder)

    target = HubTarget("alice/s-new", private=True, token=local_hub.write_token)
    result = sweep(folders, ["sma"], [1, 2], score=Scorer(), output_dir=tmp_path / "o", push_to_hub=target)
    assert result.greater_is_better and result.best.score == max(r.score for r in result.rows)
    assert _pushed(local_hub, "alice/s-new") == ("Upload the best merge of a pmakit sweep", True)
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]
    lower = sweep(folders, ["sma"], [1, 2], score=Scorer(), greater_is_better=False)  # an explicit direction wins
    assert lower.best.score == min(r.score for r in lower.rows)


def test_sweep_old_spellings_warn_and_still_work(folders, tmp_path, local_hub):
    with pytest.warns(FutureWarning) as record:
        result = sweep(
            folders,
            ["sma"],
            [1, 2],
            score=_norm_sum,
            higher_is_better=True,
            output_dir=tmp_path / "o",
            push_to_hub="alice/s-old",
            private=True,
            token=local_hub.write_token,
        )
    messages = " ".join(str(w.message) for w in record)
    assert all(f"`{old}=` of sweep is deprecated" in messages for old in ("higher_is_better", "private", "token"))
    assert result.best.score == max(r.score for r in result.rows)
    assert _pushed(local_hub, "alice/s-old") == ("Upload the best merge of a pmakit sweep", True)
    with pytest.warns(FutureWarning, match="`SweepResult.higher_is_better` is deprecated"):
        assert result.higher_is_better is True

    class OldScorer:
        higher_is_better = True

        def __call__(self, folder):
            return _norm_sum(folder)

    with pytest.warns(FutureWarning, match=r"A scorer's `higher_is_better` \(OldScorer\)"):
        assert sweep(folders, ["sma"], [1, 2], score=OldScorer()).greater_is_better is True


def test_sweep_refuses_both_spellings_before_any_merge(folders, tmp_path):
    with pytest.raises(InputError, match="give `greater_is_better` only"):
        sweep(folders, ["sma"], [1], score=_never, greater_is_better=True, higher_is_better=True)
    with pytest.warns(FutureWarning), pytest.raises(InputError, match=r"sweep: put private=\.\.\. in the HubTarget"):
        sweep(folders, ["sma"], [1], score=_never, output_dir=tmp_path, push_to_hub=HubTarget("a/b"), private=True)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ FusionBench class
def test_fusionbench_class_push_shapes(folders, tmp_path, local_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", local_hub.write_token)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the new shapes, and False, do not warn
        target = HubTarget("alice/fb-new", private=True, commit_message="fb")
        WeightedAverageForLLama(merged_model_save_path=tmp_path / "new", push_to_hub=target).run(folders, load=False)
        quiet = WeightedAverageForLLama(merged_model_save_path=tmp_path / "none", push_to_hub=False)
        assert quiet.run(folders, load=False).commit_url is None
    assert _pushed(local_hub, "alice/fb-new") == ("fb", True)
    merger = WeightedAverageForLLama(merged_model_save_path=tmp_path / "fb-old", push_to_hub=True)
    with pytest.warns(FutureWarning, match="`push_to_hub=True` of WeightedAverageForLLama is deprecated"):
        result = merger.run(folders, load=False)  # True: the save path's folder name is the repo
    assert result.commit_url and local_hub.files("alice/fb-old")["model.safetensors"]
    assert torch.equal(
        read_folder(tmp_path / "fb-old")["model.norm.weight"], read_folder(tmp_path / "new")["model.norm.weight"]
    )
