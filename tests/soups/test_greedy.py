"""Greedy soup against a brute-force fp64 reference of the procedure, with a function and with a Trainer."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from pmakit import HubTarget
from pmakit.soups.greedy import greedy_soup
from tests.helpers.models import TokenDataset, tiny_llama


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().double() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Five candidates theta0 + a_i d + sigma_i noise_i, and a target theta0 + d (score: minus squared distance)."""
    root = tmp_path_factory.mktemp("soup")
    base = tiny_llama(0)
    theta0 = _params(base)
    gen = torch.Generator().manual_seed(5)
    direction = {n: torch.randn(t.shape, generator=gen, dtype=torch.float64) * 0.05 for n, t in theta0.items()}
    target = {n: theta0[n] + direction[n] for n in theta0}
    folders = []
    for i, (a, sigma) in enumerate([(0.9, 0.02), (1.1, 0.03), (0.5, 0.01), (1.0, 0.08), (0.95, 0.025)]):
        model = tiny_llama(0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float64) * sigma
                p.copy_(theta0[n] + a * direction[n] + noise)
        model.save_pretrained(root / f"c{i}")
        folders.append(root / f"c{i}")
    return {"folders": folders, "target": target, "root": root}


def _score(params: dict, target: dict) -> float:
    return -float(sum(((params[n] - target[n]) ** 2).sum() for n in target))


def _brute_force(folders, target, strict):
    """The greedy procedure written plainly: every candidate in memory, soups as fp64 means."""
    states = [{k: v.double() for k, v in load_file(f / "model.safetensors").items()} for f in folders]
    own = [_score(s, target) for s in states]
    order = sorted(range(len(states)), key=lambda i: -own[i])
    kept, best = [order[0]], own[order[0]]
    for i in order[1:]:
        trial = [*kept, i]
        soup = {k: sum(states[j][k] for j in trial) / len(trial) for k in target}
        s = _score(soup, target)
        if (s > best) if strict else (s >= best):
            kept, best = trial, s
    soup = {k: sum(states[j][k] for j in kept) / len(kept) for k in target}
    return [folders[j] for j in order], [str(folders[j]) for j in kept], best, soup


@pytest.mark.parametrize("strict", [False, True])
def test_matches_brute_force_reference_and_ties(setup, tmp_path, strict):
    folders, target = list(setup["folders"]), setup["target"]
    # An exact copy of the best candidate: adding it leaves the soup unchanged, a tie that only non-strict keeps.
    twin = tmp_path / "twin"
    order, _, _, _ = _brute_force(folders, target, strict)
    shutil.copytree(order[0], twin)
    folders.append(twin)
    order, kept, best, soup = _brute_force(folders, target, strict)

    model = tiny_llama(0)
    result = greedy_soup(
        folders,
        lambda m: _score(_params(m), target),
        model=model,
        greater_is_better=True,
        strict=strict,
        output_dir=tmp_path / "out",
    )
    assert [s.path for s in result.steps] == [str(f) for f in order]
    assert result.kept == kept
    assert 2 <= len(kept) < len(folders)  # a real choice was made
    assert (str(twin) in result.kept) is (not strict)
    assert result.final_score == pytest.approx(best, rel=1e-5)
    assert result.final_score >= result.steps[0].score
    written = load_file(tmp_path / "out" / "model.safetensors")
    for name, ref in soup.items():
        assert torch.allclose(written[name].double(), ref, atol=1e-6), name
        assert torch.allclose(dict(model.named_parameters())[name].double(), ref, atol=1e-6)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "greedy-soup" in card and card.count("| yes |") == len(kept)
    assert card.count("| no |") == len(folders) - len(kept)
    assert f"strict: {str(strict).lower()}" in card


def test_with_trainer_eval_loss_and_hub_push(setup, tmp_path, local_hub):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    folders = setup["folders"][:3]
    data = TokenDataset(n=32, seed=3)
    args = TrainingArguments(
        output_dir=str(tmp_path / "t"),
        use_cpu=True,
        report_to="none",
        per_device_eval_batch_size=16,
        disable_tqdm=True,
    )
    trainer = Trainer(model=tiny_llama(0), args=args, eval_dataset=data)
    result = greedy_soup(
        folders,
        trainer,
        output_dir=tmp_path / "soup",
        push_to_hub=HubTarget("alice/soup", token=local_hub.write_token),
    )

    def eval_loss(model) -> float:  # independent of the Trainer: mean of the two 16-sample batch losses
        with torch.no_grad():
            return (
                sum(float(model(input_ids=data.ids[i : i + 16], labels=data.ids[i : i + 16]).loss) for i in (0, 16))
                / 2
            )

    own = {str(f): eval_loss(AutoModelForCausalLM.from_pretrained(f)) for f in folders}
    assert result.metric == "eval_loss" and result.greater_is_better is False
    assert [s.path for s in result.steps] == sorted(own, key=own.get)
    for s in result.steps:
        assert s.score == pytest.approx(own[s.path], rel=1e-5)
    soup_model = AutoModelForCausalLM.from_pretrained(tmp_path / "soup")
    assert eval_loss(soup_model) == pytest.approx(result.final_score, rel=1e-5)
    assert result.final_score <= result.steps[0].score
    files = local_hub.files("alice/soup")
    assert files["model.safetensors"] == (tmp_path / "soup" / "model.safetensors").read_bytes()
    assert "eval_loss" in files["README.md"].decode()


def test_errors_are_clear(setup, tmp_path):
    folders = setup["folders"]
    with pytest.raises(ValueError, match="greater_is_better"):
        greedy_soup(folders, lambda m: 0.0, model=tiny_llama(0))
    with pytest.raises(ValueError, match="listed twice"):
        greedy_soup([folders[0], folders[0]], lambda m: 0.0, greater_is_better=True)
    with pytest.raises(ValueError, match="Got 1 scores for 2"):
        greedy_soup(folders[:2], lambda m: 0.0, greater_is_better=True, scores=[1.0])
    other = tmp_path / "other"
    tiny_llama(0, tie=False).save_pretrained(other)
    with pytest.raises(ValueError, match="hold different tensors"):
        greedy_soup([folders[0], other], lambda m: 0.0, model=tiny_llama(0), greater_is_better=True)


def test_known_scores_skip_the_individual_evaluations(setup):
    folders, target = setup["folders"], setup["target"]
    _, kept, best, _ = _brute_force(folders, target, strict=True)
    own = [_score({k: v.double() for k, v in load_file(f / "model.safetensors").items()}, target) for f in folders]
    calls = []

    def evaluate(model):
        calls.append(1)
        return _score(_params(model), target)

    result = greedy_soup(folders, evaluate, model=tiny_llama(0), scores=own, greater_is_better=True, strict=True)
    assert len(calls) == len(folders) - 1  # only the trial soups were evaluated
    assert result.kept == kept and result.final_score == pytest.approx(best, rel=1e-5)
    assert result.output_dir is None
