"""Learned soup: coefficients move to the better candidate on a case with a known answer; the folder loads."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from pmakit import HubTarget
from pmakit.soups.learned import fit_learned_soup, soup_loss
from tests.helpers.models import TokenDataset, tiny_llama


def _noisy(seed: int, scale: float):
    model = tiny_llama(seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _batches(n: int = 6, seed: int = 4):
    ids = TokenDataset(n=4 * n, seed=seed).ids
    return [{"input_ids": ids[i : i + 4], "labels": ids[i : i + 4]} for i in range(0, len(ids), 4)]


def test_coefficients_move_to_the_best_candidate_and_folder_loads(tmp_path):
    # Known answer: the tokens are uniform random, so the best model predicts a uniform distribution.
    # A freshly initialised model is nearly uniform; adding large noise to its matrices makes it confidently
    # wrong. The soup must put its weight on the clean candidate.
    clean, noisy, noisier = tiny_llama(seed=0), _noisy(1, 0.2), _noisy(2, 0.3)
    clean.save_pretrained(tmp_path / "clean")  # one candidate given as a folder, the others as modules
    data = _batches()
    soup = fit_learned_soup(
        tiny_llama(seed=7),
        [noisy, str(tmp_path / "clean"), noisier],
        data,
        epochs=5,
        lr=0.2,
        labels=["noisy", "clean", "noisier"],
    )
    c = soup.coefficients
    assert sum(c) == pytest.approx(1.0, abs=1e-12)
    assert c[1] > 0.8 and c[1] > c[0] > c[2], c
    assert soup.losses[-1] < soup.losses[0]
    # the merged weights are exactly sum_i c_i theta_i (fp64 reference)
    cands = [noisy, clean, noisier]
    for name in ("model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"):
        direct = sum(ci * dict(m.named_parameters())[name].double() for ci, m in zip(c, cands, strict=True))
        torch.testing.assert_close(soup.state_dict[name], direct.float(), rtol=1e-6, atol=1e-7)
    folder = soup.save(tiny_llama(seed=7), tmp_path / "soup")
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(loaded.model.layers[0].self_attn.q_proj.weight, soup.state_dict[q_proj])
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    card = (folder / "README.md").read_text()
    recipe = yaml.safe_load(card.split("```yaml")[1].split("```")[0])
    assert recipe["method"] == "learned_soup" and recipe["coefficients"] == [round(x, 8) for x in c]
    assert "| clean |" in card
    # the soup beats the uniform soup on the held-out data
    uniform = AutoModelForCausalLM.from_pretrained(folder)
    uniform.load_state_dict({k: sum(dict(m.state_dict())[k] for m in cands) / 3 for k in clean.state_dict()})
    with torch.no_grad():
        soup_loss_value = sum(float(soup_loss(loaded(input_ids=b["input_ids"]), b, torch.tensor(1.0))) for b in data)
        uniform_value = sum(float(soup_loss(uniform(input_ids=b["input_ids"]), b, torch.tensor(1.0))) for b in data)
    assert soup_loss_value < uniform_value


def test_temperature_learns_to_soften_confident_logits():
    sharp = _noisy(3, 0.3)
    soup = fit_learned_soup(tiny_llama(seed=0), [sharp, _noisy(4, 0.3)], _batches(), epochs=3, lr=0.2)
    assert soup.temperature < 0.9  # random labels: the best calibration shrinks the logits
    fixed = fit_learned_soup(
        tiny_llama(seed=0), [sharp, _noisy(4, 0.3)], _batches(), max_steps=2, fit_temperature=False
    )
    assert fixed.temperature == 1.0 and fixed.settings["steps"] == 2


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="at least 2"):
        fit_learned_soup(tiny_llama(), [tiny_llama()], _batches())
    with pytest.raises(FileNotFoundError, match="missing_folder"):
        fit_learned_soup(tiny_llama(), [tiny_llama(), tmp_path / "missing_folder"], _batches())
    with pytest.raises(ValueError, match="lacks parameter"):
        fit_learned_soup(tiny_llama(), [tiny_llama(), {"x": torch.zeros(1)}], _batches())


def test_soup_pushed_to_the_hub_with_its_card(local_hub, tmp_path):
    soup = fit_learned_soup(tiny_llama(seed=0), [tiny_llama(seed=0), _noisy(5, 0.1)], _batches(n=2), max_steps=2)
    soup.save(
        tiny_llama(seed=0),
        tmp_path / "soup",
        push_to_hub=HubTarget("soup", token=local_hub.write_token, commit_message="Add learned soup"),
    )
    files = local_hub.files("alice/soup")
    assert files["README.md"] == (tmp_path / "soup" / "README.md").read_bytes()
    assert b"learned_soup" in files["README.md"] and "model.safetensors" in files
    assert local_hub.commits("alice/soup")[0] == "Add learned soup"
