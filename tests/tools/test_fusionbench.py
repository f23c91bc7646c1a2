"""`WeightedAverageForLLama` with FusionBench's semantics: the base apart, weights for the others, config donor."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pmakit import WeightedAverageForLLama
from pmakit.errors import MergeError
from tests.helpers.folders import read_folder, save_models


BACKBONE = ("model.embed_tokens.weight", "model.norm.weight")  # tied: the LM head is the embedding


def _tagged_models(root, n):
    """``n`` tiny Llamas with tokenizers; each folder's config and tokenizer config name the folder."""
    folders = save_models(root, n, tokenizer=True)
    for folder in folders:
        for file in ("config.json", "tokenizer_config.json"):
            data = json.loads((folder / file).read_text())
            data["pmakit_test_origin"] = folder.name
            (folder / file).write_text(json.dumps(data))
    return folders


def _origins(folder):
    return [
        json.loads((folder / f).read_text())["pmakit_test_origin"] for f in ("config.json", "tokenizer_config.json")
    ]


def _closed_form(folders, weights):
    """sum_i w_i x_i / sum(w) in fp64 (the independent reference), over the given folders only."""
    states = [read_folder(f) for f in folders]
    total = sum(weights)
    return {k: sum(w / total * s[k].double() for w, s in zip(weights, states, strict=True)) for k in states[0]}


def _fp32_close(value, folders, weights, name):
    """Within an fp32 fold's rounding of the closed form: (n + 1) u sum_i |w_i x_i| elementwise."""
    states = [read_folder(f)[name].double() for f in folders]
    total = sum(weights)
    expected = sum(w / total * x for w, x in zip(weights, states, strict=True))
    bound = (len(states) + 1) * 2.0**-24 * sum(abs(w / total) * x.abs() for w, x in zip(weights, states, strict=True))
    return bool(((value.double() - expected).abs() <= bound + 1e-30).all())


def test_the_documented_call_keeps_the_base_apart(tmp_path):
    base, a, b = _tagged_models(tmp_path, 3)
    merger = WeightedAverageForLLama(weights=[1, 1], backbone_only=True, merged_model_save_path=tmp_path / "soup")
    model = merger.run([base, a, b])
    out, base_state = read_folder(tmp_path / "soup"), read_folder(base)
    for name, value in out.items():
        if name in BACKBONE:
            assert torch.equal(value, base_state[name]), name  # bitwise the base
        else:  # the base is not averaged: the mean of a and b, within fp32 rounding
            assert _fp32_close(value, [a, b], [1, 1], name), name
    assert [s.label for s in merger.result.plan.sources] == [str(a), str(b)]
    assert merger.result.plan.base.label == str(base)
    assert _origins(tmp_path / "soup") == ["m0", "m0"]  # config and tokenizer from the base
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, out["model.layers.0.mlp.up_proj.weight"])


def test_weights_apply_to_the_models_other_than_the_base(tmp_path):
    base, a, b = _tagged_models(tmp_path, 3)
    merger = WeightedAverageForLLama(
        weights=[1, 3], merged_model_save_path=tmp_path / "soup", accumulate_dtype="float64"
    )
    assert merger.run([base, a, b], load=False) is merger.result
    out, expected = read_folder(tmp_path / "soup"), _closed_form([a, b], [1, 3])
    for name, value in out.items():
        if name not in BACKBONE:
            assert torch.equal(value, expected[name].float()), name  # fp64 accumulation: bitwise
    assert merger.result.plan.weights == [0.25, 0.75]


def test_an_explicit_base_gives_config_and_every_model_is_averaged(tmp_path):
    base, a, b = _tagged_models(tmp_path, 3)
    merger = WeightedAverageForLLama(
        weights=[2, 1], backbone_only=False, base_model=base, merged_model_save_path=tmp_path / "soup"
    )
    merger.run([a, b], load=False)
    out = read_folder(tmp_path / "soup")
    assert all(_fp32_close(value, [a, b], [2, 1], name) for name, value in out.items())
    assert _origins(tmp_path / "soup") == ["m0", "m0"]


def test_without_a_base_config_and_tokenizer_come_from_the_first_model(tmp_path):
    a, b, c = _tagged_models(tmp_path, 3)
    model = WeightedAverageForLLama(backbone_only=False, merged_model_save_path=tmp_path / "soup").run([a, b, c])
    out = read_folder(tmp_path / "soup")
    assert all(_fp32_close(value, [a, b, c], [1, 1, 1], name) for name, value in out.items())
    assert _origins(tmp_path / "soup") == ["m0", "m0"]  # the first model, not the newest (m2)
    assert model.config.pmakit_test_origin == "m0"


def test_no_save_path_returns_the_loaded_model_and_keeps_nothing(tmp_path):
    base, a, b = save_models(tmp_path, 3)
    model = WeightedAverageForLLama().run([base, a, b])  # backbone_only by default: m0 is the base
    up = model.model.layers[1].mlp.up_proj.weight.detach()
    assert _fp32_close(up, [a, b], [1, 1], "model.layers.1.mlp.up_proj.weight")
    assert torch.equal(model.model.norm.weight, read_folder(base)["model.norm.weight"])
    assert not os.path.exists(model.name_or_path)  # the temporary folder is gone


def test_weight_counts_are_checked_against_the_models_other_than_the_base(tmp_path):
    base, a = save_models(tmp_path, 2)
    with pytest.raises(
        MergeError, match=r"Got 2 weights for 1 models to average besides the base .*m0.* not averaged"
    ):
        WeightedAverageForLLama(weights=[1, 1], merged_model_save_path=tmp_path / "o").run([base, a])
    with pytest.raises(MergeError, match=r"needs at least one model to average besides the base"):
        WeightedAverageForLLama(merged_model_save_path=tmp_path / "o").run([base])
    with pytest.raises(MergeError, match=r"Got 1 weights for 2 models to average; give one weight per averaged"):
        WeightedAverageForLLama(weights=[1], backbone_only=False, merged_model_save_path=tmp_path / "o").run([base, a])
    assert not (tmp_path / "o").exists()
