"""The plan: the buffer rule on a real BatchNorm model, the donor of config and tokenizer, the dry-run summary."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pmakit.averaging import AveragingRule
from pmakit.cli import main
from pmakit.merging import MergeError, merge
from pmakit.merging.plan import build_plan
from pmakit.merging.sources import resolve_source
from pmakit.soups.buffers import average_models
from tests.helpers.folders import save_models


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _trained_bn_folders(root, batches=(3, 5, 7)):
    """One folder per model: a small BatchNorm net after ``batches[i]`` training-mode batches."""
    folders, models = [], []
    for i, count in enumerate(batches):
        torch.manual_seed(i)
        model = _bn_net().train()
        for _ in range(count):
            model(torch.randn(16, 4) * (i + 1) + i)
        folder = root / f"bn{i}"
        folder.mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
        folders.append(folder)
        models.append(model)
    return folders, models


def test_batchnorm_counters_come_from_the_newest_and_floats_are_averaged(tmp_path):
    folders, models = _trained_bn_folders(tmp_path)
    weights = [1.0, 2.0, 3.0]
    result = merge(folders, tmp_path / "out", weights=weights, accumulate_dtype="float64")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    states = [m.state_dict() for m in models]
    assert result.plan.copied_from_newest == ["1.num_batches_tracked"]
    assert out["1.num_batches_tracked"].dtype == torch.int64 and out["1.num_batches_tracked"].item() == 7
    for name, value in out.items():
        if name.endswith("num_batches_tracked"):
            continue
        closed_form = sum(w / 6 * s[name].double() for w, s in zip(weights, states, strict=True))
        assert torch.equal(value, closed_form.float()), name  # fp64 accumulation: bitwise
    # the same rule as the torch helpers of pmakit.soups.buffers, on the same models
    in_memory = average_models(models, weights)
    assert torch.equal(in_memory["1.num_batches_tracked"], out["1.num_batches_tracked"])
    assert all(torch.allclose(in_memory[k].double(), out[k].double(), rtol=1e-6, atol=1e-7) for k in out)
    net = _bn_net()
    net.load_state_dict(out)
    assert torch.isfinite(net.eval()(torch.randn(3, 4))).all()


def test_batchnorm_merge_in_fp32_is_within_rounding_and_the_card_names_the_copies(tmp_path):
    folders, models = _trained_bn_folders(tmp_path)
    plan = merge(folders, tmp_path / "out").plan
    (title, text), *rest = plan.card_details()
    assert title == "Copied from the newest input" and rest == []
    assert f"`{folders[2]}`: `1.num_batches_tracked`." in text
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    states = [m.state_dict() for m in models]
    for name in ("1.running_mean", "1.running_var", "0.weight"):
        mean = sum(s[name].double() for s in states) / 3
        assert torch.allclose(out[name].double(), mean, rtol=4 * 2.0**-24, atol=1e-30), name
    assert out["1.num_batches_tracked"].item() == 7


def test_dry_run_says_how_many_tensors_are_copied_from_the_newest(tmp_path, capsys):
    folders, _ = _trained_bn_folders(tmp_path)
    plan = merge(folders, dry_run=True).plan
    assert "copied from the newest input 1 (integer/bool);" in plan.describe()
    assert plan.bytes_to_read == sum(i.nbytes for t in plan.tensors for i in t.inputs)
    newest = [t for t in plan.tensors if t.action == "newest"]
    assert [i.file.parent.name for t in newest for i in t.inputs] == ["bn2"]  # only the newest is read
    assert main(["average", *map(str, folders), "-o", str(tmp_path / "o"), "--dry-run"]) == 0
    assert "copied from the newest input 1 (integer/bool);" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


def test_integer_tensors_must_still_match_in_shape(tmp_path):
    folders, _ = _trained_bn_folders(tmp_path, batches=(1, 2))
    state = load_file(str(folders[1] / "model.safetensors"))
    state["1.num_batches_tracked"] = torch.tensor([2, 2])
    save_file(state, str(folders[1] / "model.safetensors"))
    with pytest.raises(MergeError, match=r"Shape mismatch for tensor '1\.num_batches_tracked': \[\] in .*bn0"):
        merge(folders, tmp_path / "out")


def _loaded(folders):
    return [resolve_source(str(f)).load() for f in folders]


def test_donor_chooses_the_input_that_gives_config_and_tokenizer(tmp_path):
    sources = _loaded(save_models(tmp_path, 3))
    base = _loaded(save_models(tmp_path / "b", 1, seed0=9))[0]
    rule = AveragingRule("sma")
    assert build_plan(sources, rule).donor is sources[-1]
    assert build_plan(sources, rule, base=base).donor is base
    assert build_plan(sources, rule, base=base, donor="first").donor is sources[0]
    assert build_plan(sources, rule, base=base, donor="newest").donor is sources[-1]
    assert build_plan(sources, rule, base=base, donor="base").donor is base
    assert build_plan(sources, rule, donor="first").donor is sources[0]
    with pytest.raises(MergeError, match=r"`donor` must be one of first, newest, base \(or None\), got 'oldest'"):
        build_plan(sources, rule, donor="oldest")
    with pytest.raises(MergeError, match=r"`donor='base'` needs a base model"):
        build_plan(sources, rule, donor="base")


def test_donor_is_the_reference_architecture(tmp_path):
    folders = save_models(tmp_path, 2)
    config = json.loads((folders[0] / "config.json").read_text())
    config["model_type"] = "mistral"
    (folders[0] / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match=r"different architectures: .*m1 is llama .*m0 is mistral"):
        build_plan(_loaded(folders), AveragingRule("sma"), donor="first")


def test_card_details_name_the_tensors_kept_from_the_base(tmp_path):
    sources = _loaded(save_models(tmp_path, 2))
    base = _loaded(save_models(tmp_path / "b", 1, seed0=9))[0]
    plan = build_plan(sources, AveragingRule("sma"), base=base, backbone_only=True)
    assert plan.card_details() == [
        ("Backbone only", f"Taken unchanged from `{base.label}`: `model.embed_tokens.weight`, `model.norm.weight`.")
    ]
    assert build_plan(sources, AveragingRule("sma")).card_details() == []
