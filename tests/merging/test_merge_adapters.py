"""PEFT LoRA adapter folders average like models: adapter weights only, adapter config from the newest."""

from __future__ import annotations

import torch

from pmakit.merging import merge
from tests.helpers.folders import read_folder
from tests.helpers.models import tiny_llama


def test_lora_adapters_average_and_load(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    folders = []
    for i in range(2):
        model = get_peft_model(
            tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_()
        model.save_pretrained(tmp_path / f"adapter{i}")
        folders.append(tmp_path / f"adapter{i}")
    result = merge(folders, tmp_path / "out")
    assert result.plan.shard_names == ["adapter_model.safetensors"]
    a, b, out = (read_folder(p) for p in (*folders, tmp_path / "out"))
    assert out.keys() == a.keys()
    for name in out:
        assert torch.allclose(out[name], (a[name] + b[name]) / 2, atol=1e-6), name
    assert "library_name: peft" in (tmp_path / "out" / "README.md").read_text()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "out")
    name = next(n for n in out if "lora_A" in n)
    module = name.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
    weight = loaded.base_model.model.get_submodule(module).lora_A["default"].weight
    assert torch.equal(weight, out[name])
