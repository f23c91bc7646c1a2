"""The output folder: all-or-nothing, shards and index, backbone-only, donor files, card, recipe, surfaces."""

from __future__ import annotations

import errno
import json

import pytest
import torch
import yaml

from pmakit import HubTarget
from pmakit.io.safetensors import ShardWriter
from pmakit.merging import RECIPE_FILE, MergeError, load_recipe, merge
from tests.helpers.folders import make_tokenizer, read_folder, save_models


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((".", "_")))


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    folders = save_models(tmp_path, 3)
    real_write, calls = ShardWriter.write, []

    def failing_write(self, tensor, offset, data):
        calls.append(tensor.name)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, tensor, offset, data)

    monkeypatch.setattr(ShardWriter, "write", failing_write)
    with pytest.raises(OSError, match="No space left"):
        merge(folders, tmp_path / "out", max_shard_size="20KB", threads=2, block_elements=500)
    assert len(calls) >= 5 and not (tmp_path / "out").exists() and _leftovers(tmp_path) == []

    # an existing model is kept intact when the replacement fails
    monkeypatch.setattr(ShardWriter, "write", real_write)
    merge(folders[:2], tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    calls.clear()
    monkeypatch.setattr(ShardWriter, "write", failing_write)
    with pytest.raises(OSError):
        merge(folders, tmp_path / "out", overwrite=True, block_elements=500)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before and _leftovers(tmp_path) == []


def test_existing_output_refused_unless_overwrite(tmp_path):
    folders = save_models(tmp_path, 2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        merge(folders, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    merge(folders, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model.safetensors").is_file()


def test_shards_index_load_and_generate(tmp_path):
    from transformers import AutoModelForCausalLM

    folders = save_models(tmp_path, 3, tokenizer=True)
    result = merge(folders, tmp_path / "out", algo="wma", max_shard_size="25KB")
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert (
        len(shards) == len(result.plan.shard_names) > 2
        and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    )
    assert set(index["weight_map"].values()) == set(shards)
    tensors = read_folder(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in shards:
        size = sum(tensors[n].numel() * 4 for n, f in index["weight_map"].items() if f == shard)
        assert size <= 25_000 or sum(1 for f in index["weight_map"].values() if f == shard) == 1
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # tied, stored once
    assert "lm_head.weight" not in tensors
    generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("t1 t2")["input_ids"] == [1, 2]


@pytest.mark.parametrize("tie", [True, False])
def test_backbone_only_is_bitwise_base_on_embeddings_head_and_norm(tmp_path, tie):
    base, *others = save_models(tmp_path, 3, tie=tie, dtype=torch.bfloat16)
    result = merge(others, tmp_path / "out", base_model=base, backbone_only=True, weights=[1, 3])
    out, b, o1, o2 = (read_folder(p) for p in (tmp_path / "out", base, *others))
    kept = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if tie else {"lm_head.weight"})
    assert {t.out.name for t in result.plan.tensors if t.action == "base"} == kept
    assert ("lm_head.weight" in out) is (not tie)
    for name in out:
        if name in kept:
            assert torch.equal(out[name], b[name]), name
        else:
            expected = (0.25 * o1[name].float() + 0.75 * o2[name].float()).to(torch.bfloat16)
            assert (out[name].float() - expected.float()).abs().max() <= 2 * 2**-8 * expected.float().abs().max(), name
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Backbone only" in card and "model.norm.weight" in card


def test_custom_backbone_patterns(tmp_path):
    base, other = save_models(tmp_path, 2)
    result = merge(
        [other], tmp_path / "out", base_model=base, backbone_only=True, backbone_patterns=[r"layers\.0\.self_attn\."]
    )
    kept = sorted(t.out.name for t in result.plan.tensors if t.action == "base")
    assert kept == [f"model.layers.0.self_attn.{p}_proj.weight" for p in "koqv"]
    with pytest.raises(MergeError, match="no tensor matches the backbone patterns"):
        merge([other], tmp_path / "o2", base_model=base, backbone_only=True, backbone_patterns=["nothing"])


def test_config_and_tokenizer_from_base_else_newest(tmp_path):
    a, b = save_models(tmp_path, 2, tokenizer=True)
    base = save_models(tmp_path, 1, names=["base"], seed0=7)[0]
    make_tokenizer().save_pretrained(base)
    for folder, marker in ((a, "oldest"), (b, "newest"), (base, "base")):
        config = json.loads((folder / "config.json").read_text())
        config["marker"] = marker
        (folder / "config.json").write_text(json.dumps(config))
        tok = json.loads((folder / "tokenizer_config.json").read_text())
        tok["marker"] = marker
        (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    merge([a, b], tmp_path / "newest")
    merge([a, b], tmp_path / "based", base_model=base)
    merge([a, b], tmp_path / "notok", save_tokenizer=False)
    for out, marker in (("newest", "newest"), ("based", "base")):
        assert json.loads((tmp_path / out / "config.json").read_text())["marker"] == marker
        assert json.loads((tmp_path / out / "tokenizer_config.json").read_text())["marker"] == marker
        assert (tmp_path / out / "generation_config.json").is_file()
    assert not (tmp_path / "notok" / "tokenizer.json").exists()


def test_model_card_and_recipe_reproduce_the_merge(tmp_path):
    folders = save_models(tmp_path, 3)
    merge(folders, tmp_path / "out", algo="ema", alpha=0.3, max_shard_size="40KB")
    card = (tmp_path / "out" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "transformers" and meta["tags"] == ["merge", "pma"]
    assert "EMA (alpha=0.3) of 3 samples" in card
    recipe = yaml.safe_load((tmp_path / "out" / RECIPE_FILE).read_text())
    # local inputs relative to the folder: no absolute path of the user's layout in the card or the recipe
    assert recipe["models"] == ["../m0", "../m1", "../m2"] and recipe["alpha"] == 0.3 and "output" not in recipe
    assert str(tmp_path) not in card and str(tmp_path) not in (tmp_path / "out" / RECIPE_FILE).read_text()
    assert yaml.safe_load(card.split("```yaml")[1].split("```")[0]) == recipe  # the card quotes the exact recipe
    kwargs = load_recipe(tmp_path / "out" / RECIPE_FILE)
    kwargs["output"] = tmp_path / "again"
    merge(**kwargs)
    for f in (tmp_path / "out").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "again" / f.name).read_bytes()


def test_recipe_keys_are_checked(tmp_path):
    (tmp_path / "r.yaml").write_text("models: [a]\nalgoo: sma\n")
    with pytest.raises(MergeError, match="Unknown recipe key.*algoo"):
        load_recipe(tmp_path / "r.yaml")
    (tmp_path / "r.yaml").write_text("models: [a]\npush_to_hub: {repo_id: me/x, private: true}\n")
    assert load_recipe(tmp_path / "r.yaml") == {"models": ["a"], "push_to_hub": HubTarget("me/x", private=True)}


def test_interrupt_mid_write_leaves_nothing(tmp_path, monkeypatch):
    folders = save_models(tmp_path, 2)
    real_write, calls = ShardWriter.write, []

    def interrupted(self, tensor, offset, data):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_write(self, tensor, offset, data)

    monkeypatch.setattr(ShardWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge(folders, tmp_path / "out", threads=2, block_elements=300)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_full_disk_is_refused_before_the_merge(tmp_path, monkeypatch):
    import os

    folders = save_models(tmp_path, 2)

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(MergeError, match=r"Not enough disk space for .*model\.safetensors"):
        merge(folders, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
