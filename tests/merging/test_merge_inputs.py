"""Input selection (run folders, order) and every bad input of the issue, each refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pmakit.merging import MergeError, list_checkpoints, merge, select_checkpoints
from pmakit.merging.sources import parse_hub_reference
from tests.helpers.folders import read_folder, save_models, write_raw_safetensors


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    steps = [100, 200, 300, 400, 500, 600, 800, 1000]
    save_models(run, len(steps), names=[f"checkpoint-{s}" for s in steps])
    save_models(run, 2, names=["pma-600", "pma-1200"])
    (run / "runs").mkdir()  # unrelated folders are ignored
    return run


def _steps(found):
    return [c.step for c in found]


def test_selection_last_every_range_and_kind(run_dir):
    assert _steps(list_checkpoints(run_dir)) == [100, 200, 300, 400, 500, 600, 800, 1000]  # numeric, not text order
    assert _steps(select_checkpoints(run_dir, last=3)) == [600, 800, 1000]
    assert _steps(select_checkpoints(run_dir, every=200)) == [200, 400, 600, 800, 1000]
    assert _steps(select_checkpoints(run_dir, every=200, last=2)) == [800, 1000]
    assert _steps(select_checkpoints(run_dir, start=200, end=500)) == [200, 300, 400, 500]
    assert _steps(select_checkpoints(run_dir, end=500, every=200)) == [100, 300, 500]  # anchored at the newest kept
    assert _steps(select_checkpoints(run_dir, kind="pma")) == [600, 1200]
    with pytest.warns(UserWarning, match="only 2 match"):
        select_checkpoints(run_dir, kind="pma", last=5)
    with pytest.raises(MergeError, match="steps present: 100, 200"):
        select_checkpoints(run_dir, start=2000)
    with pytest.raises(MergeError, match="`last` must be a positive integer"):
        select_checkpoints(run_dir, last=0)


def test_run_folder_merges_chronologically_and_newest_is_donor(run_dir, tmp_path):
    result = merge([run_dir], tmp_path / "out", last=3, algo="ema", alpha=0.5)  # a run folder given as the only model
    assert [s.step for s in result.plan.sources] == [600, 800, 1000]
    assert result.plan.donor.step == 1000
    assert result.plan.weights == [0.25, 0.25, 0.5]


def test_models_keep_the_given_order(tmp_path):
    a, b = save_models(tmp_path, 2)
    result = merge([b, a], tmp_path / "out", algo="wma", dry_run=True)
    assert [s.path for s in result.plan.sources] == [
        b.resolve(),
        a.resolve(),
    ] and result.plan.donor.path == a.resolve()


def test_hub_reference_parsing(tmp_path):
    assert parse_hub_reference("owner/name") == ("owner/name", None)
    assert parse_hub_reference("owner/name@v1.0") == ("owner/name", "v1.0")
    assert parse_hub_reference("./local/dir") is None and parse_hub_reference("a/b/c") is None


# ---------------------------------------------------------------- bad inputs (issue item 9), one test each


def test_shape_mismatch_names_tensor_and_both_files(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    a = save_models(tmp_path, 1)[0]
    config = LlamaConfig.from_pretrained(a)
    config.intermediate_size = 48
    LlamaForCausalLM(config).save_pretrained(tmp_path / "wide")
    with pytest.raises(
        MergeError, match=r"Shape mismatch for tensor 'model\.layers\.0\.mlp\.down_proj\.weight'.*wide.*m0"
    ):
        merge([tmp_path / "wide", a], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tensor_missing_from_one_input(tmp_path):
    a, b = save_models(tmp_path, 2)
    state = read_folder(b)
    del state["model.norm.weight"]
    from safetensors.torch import save_file

    save_file(state, b / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeError, match=r"'model\.norm\.weight' is missing from input .*m1"):
        merge([a, b], tmp_path / "out")


def test_different_architectures(tmp_path):
    a, b = save_models(tmp_path, 2)
    config = json.loads((b / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (b / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match="different architectures.*m0 is llama.*m1 is mistral"):
        merge([a, b], tmp_path / "out")


def _drop_architectures(folder):
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    return config


def test_a_missing_architectures_is_accepted_when_model_type_and_tensors_agree(tmp_path):
    a, b, c = save_models(tmp_path, 3)
    merge([a, b, c], tmp_path / "reference")
    _drop_architectures(b)
    with pytest.warns(UserWarning, match=rf"{b / 'config.json'} has no `architectures`; merging it as "):
        merge([a, b, c], tmp_path / "out")
    out, ref = read_folder(tmp_path / "out"), read_folder(tmp_path / "reference")
    assert out.keys() == ref.keys() and all(torch.equal(out[k], ref[k]) for k in ref)  # the same merge, bitwise
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    _drop_architectures(c)  # the newest input (the donor of config) lacks it too: the others name it
    with pytest.warns(UserWarning) as record:
        merge([a, b, c], tmp_path / "out2")
    named = sorted(str(w.message).split(" has no ")[0] for w in record if "no `architectures`" in str(w.message))
    assert named == [str(b / "config.json"), str(c / "config.json")]  # one warning per file


def test_a_missing_architectures_is_refused_when_model_type_or_tensors_disagree(tmp_path):
    from safetensors.torch import save_file

    a, b = save_models(tmp_path, 2)
    config = _drop_architectures(b)
    state = read_folder(b)
    state["model.norm.weight"] = torch.ones(state["model.norm.weight"].numel() + 1)
    save_file(state, b / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        MergeError, match=rf"different architectures: .*{b / 'config.json'} has no `architectures` and tensor "
        r"'model\.norm\.weight' is \[\d+\] there but"
    ):  # fmt: skip
        merge([a, b], tmp_path / "out")
    del state["model.norm.weight"]
    save_file(state, b / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeError, match=r"has no `architectures` and tensor 'model\.norm\.weight' is only in .*m0"):
        merge([a, b], tmp_path / "out")
    (b / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(MergeError, match=r"different architectures: .*m1 is mistral \[\], .*m0 is llama"):
        merge([a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nan_in_an_input_is_refused_unless_allowed(tmp_path):
    from safetensors.torch import save_file

    a, b = save_models(tmp_path, 2)
    state = read_folder(b)
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, b / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' holds NaN or Inf in .*m1"):
        merge([a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    merge([a, b], tmp_path / "out", allow_nonfinite=True)
    assert torch.isnan(read_folder(tmp_path / "out")["model.layers.1.mlp.up_proj.weight"][3, 5])


def test_inf_in_a_base_tensor_is_refused(tmp_path):
    from safetensors.torch import save_file

    a, b = save_models(tmp_path, 2)
    state = read_folder(a)
    state["model.embed_tokens.weight"][0, 0] = float("inf")
    save_file(state, a / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeError, match=r"'model\.embed_tokens\.weight' holds NaN or Inf"):
        merge([a, b], tmp_path / "out", base_model=a, backbone_only=True)


@pytest.mark.parametrize("damage", ["truncated", "bad_header", "short", "overlap"])
def test_corrupt_or_truncated_safetensors(tmp_path, damage):
    a, b = save_models(tmp_path, 2)
    file = b / "model.safetensors"
    data = file.read_bytes()
    if damage == "truncated":
        file.write_bytes(data[: len(data) - 100])
    elif damage == "bad_header":
        file.write_bytes(data[:8] + b"{not json" + data[17:])
    elif damage == "short":
        file.write_bytes(data[:5])
    else:
        write_raw_safetensors(
            file,
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            bytes(12),
        )
    with pytest.raises(MergeError, match=r"Corrupt or truncated safetensors file .*m1/model\.safetensors"):
        merge([a, b], tmp_path / "out")


def test_number_of_weights_must_match_number_of_models(tmp_path):
    folders = save_models(tmp_path, 3)
    with pytest.raises(MergeError, match="Got 2 weights for 3 samples"):
        merge(folders, tmp_path / "out", weights=[1, 2])


def test_weights_summing_to_zero_with_normalize(tmp_path):
    folders = save_models(tmp_path, 2)
    with pytest.raises(MergeError, match="sum to zero.*normalize=False"):
        merge(folders, tmp_path / "out", weights=[1, -1])
    merge(folders, tmp_path / "out", weights=[1, -1], normalize=False)  # a task vector is fine unnormalised


def test_same_input_twice_warns_and_counts_twice(tmp_path):
    a, b = save_models(tmp_path, 2)
    with pytest.warns(UserWarning, match="given twice"):
        result = merge([a, b, str(a) + "/"], tmp_path / "out", algo="sma")
    out, sa, sb = read_folder(tmp_path / "out"), read_folder(a), read_folder(b)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert len(result.plan.sources) == 3
    assert torch.allclose(out[name].double(), (2 * sa[name].double() + sb[name].double()) / 3, atol=1e-6)


def test_pickled_checkpoints_refused_by_default_and_read_by_the_allow_list(tmp_path):
    a, b = save_models(tmp_path, 2)
    state = read_folder(b)
    (b / "model.safetensors").unlink()
    torch.save(state, b / "pytorch_model.bin")
    with pytest.raises(MergeError, match=r"only pickled checkpoints \(pytorch_model\.bin\).*allow_pickle=True"):
        merge([a, b], tmp_path / "out")
    merge([a, b], tmp_path / "out", allow_pickle=True)
    out, sa = read_folder(tmp_path / "out"), read_folder(a)
    for name in sa:
        assert torch.allclose(out[name], (sa[name] + state[name]) / 2, atol=1e-6)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, b / "pytorch_model.bin")
    with pytest.raises(MergeError, match=r"pickles (__builtin__|builtins)\.print, which is not allowed"):
        merge([a, b], tmp_path / "out2", allow_pickle=True)


def test_output_inside_an_input_is_refused(tmp_path):
    a, b = save_models(tmp_path, 2)
    with pytest.raises(MergeError, match="inside input"):
        merge([a, b], b / "merged")
    assert not (b / "merged").exists()


def test_integer_tensors_are_copied_from_the_newest_input(tmp_path):
    folders = []
    for i, steps in enumerate(([1, 2, 3], [1, 2, 3], [1, 2, 4])):
        folder = tmp_path / f"i{i}"
        folder.mkdir()
        ints = np.array(steps, dtype=np.int64).tobytes()
        floats = np.full(4, float(i), dtype=np.float32).tobytes()
        header = {
            "count": {"dtype": "I64", "shape": [3], "data_offsets": [0, 24]},
            "w": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]},
        }
        write_raw_safetensors(folder / "model.safetensors", header, ints + floats)
        folders.append(folder)
    result = merge(folders, tmp_path / "out")
    out = read_folder(tmp_path / "out")
    assert out["count"].tolist() == [1, 2, 4] and out["w"].tolist() == [1.0] * 4  # newest's ints, mean of 0, 1, 2
    assert result.plan.copied_from_newest == ["count"]
    assert [i.file.parent.name for t in result.plan.tensors if t.action == "newest" for i in t.inputs] == ["i2"]


def test_bad_settings_name_the_field(tmp_path):
    folders = save_models(tmp_path, 2)
    with pytest.raises(MergeError, match="`algo` must be one of sma, .*; got 'median'"):
        merge(folders, tmp_path / "o", algo="median")
    with pytest.raises(MergeError, match="`max_shard_size`"):
        merge(folders, tmp_path / "o", max_shard_size="5 parsecs")
    with pytest.raises(MergeError, match="`out_dtype` must be a floating dtype"):
        merge(folders, tmp_path / "o", out_dtype="int8")
    with pytest.raises(MergeError, match="neither a local folder nor a Hub id"):
        merge([folders[0], tmp_path / "missing" / "x" / "y"], tmp_path / "o")
    with pytest.raises(MergeError, match="backbone_only needs a base model"):
        merge(folders, tmp_path / "o", backbone_only=True)
