"""LoRA adapter averaging: factor vs exact (concat, merge), checked against the dense fp64 average of s·B·A."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pmakit.averaging import merge_weights
from pmakit.soups.lora import average_lora_adapters, load_lora_adapter, lora_deltas
from tests.helpers.models import SEQ, VOCAB, tiny_llama


TARGETS = ["q_proj", "v_proj"]


def _make_adapter(folder, seed, r=4, alpha=8, shared_a=None, rslora=False, untied=False, modules_to_save=None):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(0, tie=not untied)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=TARGETS,
        init_lora_weights=False,
        use_rslora=rslora,
        modules_to_save=modules_to_save,
    )
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.normal_(0, 0.3)
                if shared_a is not None and "lora_A" in name:
                    p.copy_(shared_a[name])
    model.save_pretrained(folder)
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    paths = []
    for i, (r, alpha, rs) in enumerate([(4, 8, False), (2, 16, True), (4, 8, False)]):
        _make_adapter(root / f"a{i}", seed=10 + i, r=r, alpha=alpha, rslora=rs)
        paths.append(root / f"a{i}")
    same_rank = []
    for i in range(3):
        _make_adapter(root / f"s{i}", seed=20 + i)
        same_rank.append(root / f"s{i}")
    shared = []
    a_factors = _make_adapter(root / "h0", seed=30)
    shared.append(root / "h0")
    for i in (1, 2):
        _make_adapter(root / f"h{i}", seed=30 + i, shared_a=a_factors)
        shared.append(root / f"h{i}")
    base = root / "base"
    tiny_llama(0).save_pretrained(base)
    return {"mixed": paths, "same": same_rank, "shared_a": shared, "base": base, "root": root}


def _reference(paths, weights):
    """Dense fp64 reference, independent of pmakit.soups.lora: sum_i w_i (alpha_i/r_i or alpha_i/sqrt r_i) B_i A_i."""
    out = {}
    for path, w in zip(paths, weights, strict=True):
        cfg = json.loads((path / "adapter_config.json").read_text())
        t = load_file(path / "adapter_model.safetensors")
        for key in t:
            if key.endswith("lora_A.weight"):
                module = key[: -len(".lora_A.weight")]
                a, b = t[key].double(), t[module + ".lora_B.weight"].double()
                r = a.shape[0]
                s = cfg["lora_alpha"] / (r**0.5 if cfg["use_rslora"] else r)
                out[module] = out.get(module, 0) + w * s * (b @ a)
    return out


def _dense_from_folder(folder):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    t = load_file(folder / "adapter_model.safetensors")
    out = {}
    for key in t:
        if key.endswith("lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            a, b = t[key].double(), t[module + ".lora_B.weight"].double()
            s = cfg["lora_alpha"] / a.shape[0]
            assert not cfg["use_rslora"] and not cfg["rank_pattern"]
            out[module] = s * (b @ a)
    return out


def _logits(model):
    ids = torch.arange(1, SEQ + 1).remainder(VOCAB - 1).add(1).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def test_concat_and_merge_equal_dense_average_and_load(adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    paths = adapters["mixed"]  # ranks 4, 2, 4; one rsLoRA: different scalings
    weights = merge_weights(3, "ema", alpha=0.3)
    ref = _reference(paths, weights)

    concat = average_lora_adapters(paths, tmp_path / "concat", method="concat", algo="ema", alpha=0.3)
    got = _dense_from_folder(concat)
    assert set(got) == set(ref)
    for module in ref:
        assert torch.allclose(got[module], ref[module], rtol=1e-5, atol=1e-6), module
    assert json.loads((concat / "adapter_config.json").read_text())["r"] == 10

    merged = average_lora_adapters(
        paths,
        tmp_path / "merged",
        method="merge",
        algo="ema",
        alpha=0.3,
        base_model=adapters["base"],
        accumulate_dtype=torch.float64,
    )
    base_t, merged_t = load_file(adapters["base"] / "model.safetensors"), load_file(merged / "model.safetensors")
    for module, delta in ref.items():
        key = module.removeprefix("base_model.model.") + ".weight"
        assert torch.allclose(merged_t[key].double() - base_t[key].double(), delta, atol=1e-6), key
    untouched = [k for k in base_t if not any(k == m.removeprefix("base_model.model.") + ".weight" for m in ref)]
    assert untouched and all(torch.equal(base_t[k], merged_t[k]) for k in untouched)
    assert "tags:\n- merge\n- pma\n- lora" in (merged / "README.md").read_text()

    # Both load with the ordinary APIs and give the same model.
    peft_model = PeftModel.from_pretrained(tiny_llama(0), concat)
    dense_model = AutoModelForCausalLM.from_pretrained(merged)
    assert torch.allclose(_logits(peft_model), _logits(dense_model), atol=1e-4)
    assert not torch.allclose(_logits(tiny_llama(0)), _logits(dense_model), atol=1e-3)


def test_factor_averaging_differs_from_the_average_of_updates(adapters, tmp_path):
    from peft import PeftModel

    paths = adapters["same"]
    weights = merge_weights(3, "sma")
    ref = _reference(paths, weights)
    out = average_lora_adapters(paths, tmp_path / "factor", method="factor")
    got = _dense_from_folder(out)
    tensors = load_file(out / "adapter_model.safetensors")
    inputs = [load_file(p / "adapter_model.safetensors") for p in paths]
    for key, value in tensors.items():  # the factors are the plain SMA of the factors ...
        expected = sum(w * t[key].double() for w, t in zip(weights, inputs, strict=True))
        assert torch.allclose(value.double(), expected, atol=1e-6)
    for module in ref:  # ... which is far from the SMA of the updates (the cross terms w_i w_j B_i A_j remain)
        rel = (got[module] - ref[module]).norm() / ref[module].norm()
        assert rel > 0.3, (module, float(rel))
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    PeftModel.from_pretrained(tiny_llama(0), out)  # a valid same-rank adapter

    # With a shared A, (sum w_i B_i) A = sum w_i B_i A: factor averaging is exact.
    shared = adapters["shared_a"]
    exact = _dense_from_folder(average_lora_adapters(shared, tmp_path / "shared", method="factor"))
    ref_shared = _reference(shared, weights)
    for module in ref_shared:
        assert torch.allclose(exact[module], ref_shared[module], rtol=1e-5, atol=1e-6), module


def test_lora_deltas_match_reference_and_extras_are_averaged(adapters, tmp_path):
    paths = adapters["mixed"]
    weights = [0.5, 0.25, 0.25]
    loaded = [load_lora_adapter(p) for p in paths]
    ref = _reference(paths, weights)
    got = lora_deltas(loaded, weights)
    assert all(torch.allclose(got[m], ref[m], atol=1e-10) for m in ref)

    root = tmp_path
    for i in range(2):
        _make_adapter(root / f"m{i}", seed=40 + i, untied=True, modules_to_save=["lm_head"])
    out = average_lora_adapters(
        [root / "m0", root / "m1"], root / "out", method="concat", algo="weights", weights=[1, 3]
    )
    t_out = load_file(out / "adapter_model.safetensors")
    t0, t1 = (load_file(root / f"m{i}" / "adapter_model.safetensors") for i in range(2))
    key = "base_model.model.lm_head.weight"
    assert torch.allclose(t_out[key].double(), 0.25 * t0[key].double() + 0.75 * t1[key].double(), atol=1e-6)


def test_bad_inputs_are_refused_with_names(adapters, tmp_path):
    mixed = adapters["mixed"]
    with pytest.raises(ValueError, match=r"rank or shape differs .*a1"):
        average_lora_adapters([mixed[0], mixed[1]], tmp_path / "x", method="factor")
    with pytest.raises(ValueError, match="pass `base_model`"):
        average_lora_adapters(mixed, tmp_path / "x", method="merge")
    with pytest.raises(ValueError, match="method"):
        average_lora_adapters(mixed, tmp_path / "x", method="mean")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        average_lora_adapters([adapters["base"]], tmp_path / "x")
    with pytest.raises(ValueError, match="Got 2 weights for 3 samples"):
        average_lora_adapters(mixed, tmp_path / "x", algo="weights", weights=[1, 2])
    bad = adapters["root"] / "dora"
    bad.mkdir()
    cfg = json.loads((mixed[0] / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    (bad / "adapter_model.safetensors").write_bytes((mixed[0] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="DoRA"):
        average_lora_adapters([bad, mixed[0]], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_concat_with_different_target_modules_uses_a_rank_pattern(adapters, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = []
    for i, targets in enumerate([["q_proj"], ["q_proj", "v_proj"]]):
        torch.manual_seed(50 + i)
        model = get_peft_model(
            tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        )
        model.save_pretrained(tmp_path / f"t{i}")
        folders.append(tmp_path / f"t{i}")
    with pytest.raises(ValueError, match="adapt different modules"):
        average_lora_adapters(folders, tmp_path / "f", method="factor")
    concat = average_lora_adapters(folders, tmp_path / "c", method="concat")
    merged = average_lora_adapters(folders, tmp_path / "m", method="merge", base_model=adapters["base"])
    config = json.loads((concat / "adapter_config.json").read_text())
    assert config["r"] == 8 and set(config["rank_pattern"].values()) == {4}  # v_proj: only the second adapter
    got = _dense_from_folder_with_patterns(concat)
    ref = _reference(folders, [0.5, 0.5])
    assert set(got) == set(ref) and all(torch.allclose(got[m], ref[m], atol=1e-6) for m in ref)
    peft_model = PeftModel.from_pretrained(tiny_llama(0), concat)
    assert torch.allclose(_logits(peft_model), _logits(AutoModelForCausalLM.from_pretrained(merged)), atol=1e-4)


def _dense_from_folder_with_patterns(folder):
    """Scaling is 1 for every module of a concat adapter (lora_alpha == r, also in the patterns)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] and cfg["lora_alpha"] == cfg["r"]
    t = load_file(folder / "adapter_model.safetensors")
    return {
        k[: -len(".lora_A.weight")]: t[k[: -len("A.weight")] + "B.weight"].double() @ t[k].double()
        for k in t
        if k.endswith("lora_A.weight")
    }


@pytest.mark.filterwarnings("ignore:PMA")
def test_pma_folders_of_a_peft_run(tmp_path):
    """The pma-N adapter folders of a PEFT run: close to each other, so factor averaging is nearly exact there."""
    from peft import LoraConfig, get_peft_model

    from pmakit import PmaTrainer
    from pmakit.merging.sources import select_checkpoints
    from tests.helpers.models import TokenDataset
    from tests.helpers.training import pma_args

    model = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    args = pma_args(tmp_path / "run", max_steps=6, pma_interleave_step=2, pma_fused_num=1)
    PmaTrainer(model=model, args=args, train_dataset=TokenDataset()).train()
    folders = [c.path for c in select_checkpoints(tmp_path / "run", kind="pma")]
    assert [f.name for f in folders] == ["pma-2", "pma-4", "pma-6"]
    ref = _reference(folders, merge_weights(3, "wma"))
    concat = _dense_from_folder(average_lora_adapters(folders, tmp_path / "c", method="concat", algo="wma"))
    factor = _dense_from_folder(average_lora_adapters(folders, tmp_path / "f", method="factor", algo="wma"))
    for module in ref:
        assert torch.allclose(concat[module], ref[module], rtol=1e-5, atol=1e-7)
        rel = float((factor[module] - ref[module]).norm() / ref[module].norm())
        assert 0 < rel < 0.05, (module, rel)


def test_merge_into_a_sharded_base_reads_only_the_indexed_shards(adapters, tmp_path):
    """A base saved in shards with `model.safetensors.index.json`, beside a stray `*.safetensors` it does not name."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    base = tmp_path / "sharded-base"
    tiny_llama(0).save_pretrained(base, max_shard_size="40KB")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    target = "model.layers.0.self_attn.q_proj.weight"  # an adapted weight: a stray copy of it must not be read
    save_file({target: torch.full((32, 32), 1000.0)}, base / "model-old-run.safetensors")

    paths = adapters["mixed"]
    merged = average_lora_adapters(
        paths, tmp_path / "merged", method="merge", algo="wma", base_model=base, accumulate_dtype=torch.float64
    )
    assert sorted(p.name for p in merged.glob("*.safetensors")) == shards
    assert json.loads((merged / "model.safetensors.index.json").read_text())["weight_map"] == index["weight_map"]

    base_t = {k: v for shard in shards for k, v in load_file(base / shard).items()}
    merged_t = {k: v for shard in shards for k, v in load_file(merged / shard).items()}
    assert merged_t.keys() == base_t.keys()
    ref = _reference(paths, [1 / 6, 2 / 6, 3 / 6])  # WMA of 3: i / (1 + 2 + 3)
    updated = {module.removeprefix("base_model.model.") + ".weight": delta for module, delta in ref.items()}
    assert target in updated
    u32 = torch.finfo(torch.float32).eps / 2
    for key, tensor in base_t.items():
        if key in updated:  # base + fp64 weighted delta, rounded once to fp32
            expected = tensor.double() + updated[key]
            assert ((merged_t[key].double() - expected).abs() <= u32 * expected.abs() + 1e-12).all(), key
        else:
            assert torch.equal(merged_t[key], tensor), key

    loaded = AutoModelForCausalLM.from_pretrained(merged)  # through the copied index
    for key, tensor in loaded.state_dict().items():
        if key in merged_t:
            assert torch.equal(tensor, merged_t[key]), key
