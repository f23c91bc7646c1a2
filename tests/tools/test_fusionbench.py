"""`WeightedAverageForLLama` with FusionBench's semantics: no base averages every model (the first gives the head,
config and tokenizer); a named base stays apart."""

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


def _fusionbench_reference(folders, weights, normalize=True, backbone_only=True):
    """FusionBench's algorithm in fp64: sum_i w_i x_i over every model (w normalised when asked); the tensors
    outside the backbone are the first model's when there is no pre-trained model."""
    states = [read_folder(f) for f in folders]
    scale = sum(weights) if normalize else 1.0
    merged = {k: sum(w / scale * s[k].double() for w, s in zip(weights, states, strict=True)) for k in states[0]}
    if backbone_only:
        merged.update({k: states[0][k].double() for k in BACKBONE})
    return merged


def test_the_documented_call_averages_every_model_and_keeps_the_first_head(tmp_path):
    a, b = _tagged_models(tmp_path, 2)
    merger = WeightedAverageForLLama(
        weights=[0.4, 0.6], backbone_only=True, merged_model_save_path=tmp_path / "soup", accumulate_dtype="float64"
    )
    model = merger.run([a, b])
    out, expected, first = read_folder(tmp_path / "soup"), _fusionbench_reference([a, b], [0.4, 0.6]), read_folder(a)
    assert out.keys() == expected.keys()
    for name, value in out.items():
        assert torch.equal(value, expected[name].float()), name  # fp64 accumulation: bitwise the fp64 reference
        if name in BACKBONE:
            assert torch.equal(value, first[name]), name
    assert [s.label for s in merger.result.plan.sources] == [str(a), str(b)]
    assert merger.result.plan.weights == [0.4, 0.6]
    assert _origins(tmp_path / "soup") == ["m0", "m0"]  # config and tokenizer from the first model
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, out["model.layers.0.mlp.up_proj.weight"])


def test_without_a_base_the_default_fp32_sum_is_within_rounding_of_fusionbench(tmp_path):
    a, b, c = _tagged_models(tmp_path, 3)
    merger = WeightedAverageForLLama(weights=[1, 2, 5], normalize=False, merged_model_save_path=tmp_path / "soup")
    merger.run([a, b, c], load=False)
    out, expected = read_folder(tmp_path / "soup"), _fusionbench_reference([a, b, c], [1, 2, 5], normalize=False)
    states = [read_folder(f) for f in (a, b, c)]
    for name, value in out.items():
        if name in BACKBONE:
            assert torch.equal(value, states[0][name]), name
        else:  # an fp32 fold of 3 terms: within (n + 1) u sum_i |w_i x_i| of the fp64 reference
            bound = 4 * 2.0**-24 * sum(w * s[name].double().abs() for w, s in zip([1, 2, 5], states, strict=True))
            assert bool(((value.double() - expected[name]).abs() <= bound + 1e-30).all()), name
    assert merger.result.plan.weights == [1, 2, 5]


def test_weights_apply_to_the_models_other_than_a_named_base(tmp_path):
    base, a, b = _tagged_models(tmp_path, 3)
    merger = WeightedAverageForLLama(
        weights=[1, 3], base_model=base, merged_model_save_path=tmp_path / "soup", accumulate_dtype="float64"
    )
    assert merger.run([a, b], load=False) is merger.result
    out, expected, base_state = read_folder(tmp_path / "soup"), _closed_form([a, b], [1, 3]), read_folder(base)
    for name, value in out.items():
        if name in BACKBONE:
            assert torch.equal(value, base_state[name]), name  # bitwise the base
        else:
            assert torch.equal(value, expected[name].float()), name  # fp64 accumulation: bitwise
    assert merger.result.plan.weights == [0.25, 0.75]
    assert merger.result.plan.base.label == str(base)
    assert _origins(tmp_path / "soup") == ["m0", "m0"]  # config and tokenizer from the base


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
    a, b, c = save_models(tmp_path, 3)
    model = WeightedAverageForLLama().run([a, b, c])  # backbone_only by default: every model averaged, a's head
    up = model.model.layers[1].mlp.up_proj.weight.detach()
    assert _fp32_close(up, [a, b, c], [1, 1, 1], "model.layers.1.mlp.up_proj.weight")
    assert torch.equal(model.model.norm.weight, read_folder(a)["model.norm.weight"])
    assert not os.path.exists(model.name_or_path)  # the temporary folder is gone


def test_weight_counts_are_checked_against_the_models(tmp_path):
    base, a = save_models(tmp_path, 2)
    with pytest.raises(MergeError, match=r"Got 3 weights for 2 models to average; give one weight per model"):
        WeightedAverageForLLama(weights=[1, 1, 1], merged_model_save_path=tmp_path / "o").run([base, a])
    with pytest.raises(MergeError, match=r"Got 2 weights for 1 models to average \(besides the base .*m0.*\)"):
        WeightedAverageForLLama(weights=[1, 1], base_model=base, merged_model_save_path=tmp_path / "o").run([a])
    with pytest.raises(MergeError, match=r"needs at least one model to average"):
        WeightedAverageForLLama(merged_model_save_path=tmp_path / "o").run([])
    assert not (tmp_path / "o").exists()
