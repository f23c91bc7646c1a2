"""YAML recipes: the schema is the MergeOptions fields; mergekit linear recipes are read as they are."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from pmakit import HubTarget
from pmakit.cli import main
from pmakit.merging import MergeError, MergeOptions, load_recipe, merge
from pmakit.merging.recipe import RECIPE_KEYS, options_from_recipe
from tests.helpers.folders import read_folder, reference, save_models
from tests.helpers.merging import RUN_ONLY_OPTIONS


EPS32 = 2.0**-24


def _write(path, data) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_schema_is_the_inputs_and_the_recipe_fields():
    assert RECIPE_KEYS[:3] == ("models", "run_dir", "output")
    assert set(RECIPE_KEYS[3:]) == {f for f in MergeOptions.__dataclass_fields__} - RUN_ONLY_OPTIONS


def test_a_recipe_round_trips_through_options(tmp_path):
    settings = dict(
        algo="weights",
        weights=[1, 2, 3],
        normalize=False,
        base_model="base",
        backbone_only=True,
        backbone_patterns=["^lm_head\\."],
        accumulate_dtype="float64",
        out_dtype="bfloat16",
        max_shard_size="2GB",
        save_tokenizer=False,
        config_source="first",
        push_to_hub={"repo_id": "me/merged", "private": True, "revision": "v1", "commit_message": "hi"},
    )
    path = _write(tmp_path / "r.yaml", {"models": ["a", "b", "c"], "output": "out", **settings})
    inputs, options = options_from_recipe(path)
    assert inputs == {"models": ["a", "b", "c"], "output": "out"}
    assert options.weights == (1.0, 2.0, 3.0) and options.backbone_patterns == ("^lm_head\\.",)
    assert options.push_to_hub == HubTarget("me/merged", private=True, revision="v1", commit_message="hi")
    again = _write(tmp_path / "again.yaml", {"models": ["a", "b", "c"], **options.recipe_settings()})
    assert options_from_recipe(again)[1] == options


@pytest.mark.parametrize(
    "data, message",
    [
        ({"last": "three"}, "`last` must be an integer or null, got 'three'"),
        ({"alpha": [0.2]}, "`alpha` must be a number"),
        ({"normalize": "no"}, "`normalize` must be true or false"),
        ({"weights": {"a": 1}}, "`weights` must be a list of a number"),
        ({"models": 3}, "`models` must be a list of folders or Hub ids"),
        ({"models": ["a", 3]}, "`models` must be a list of folders or Hub ids"),
        ({"output": ["x"]}, "`output` must be a folder path"),
        ({"push_to_hub": {"repo": "x"}}, "`push_to_hub` takes repo_id, private, revision, commit_message"),
        ({"push_to_hub": "not a repo"}, "`push_to_hub`: Hub repo id must be"),
        ({"algorithm": "ema"}, "Unknown recipe key(s) algorithm; valid keys: models, run_dir, output, last"),
        ({"token": "hf_x"}, "Unknown recipe key(s) token"),
        ({"threads": 4}, "Unknown recipe key(s) threads"),
    ],
)
def test_wrong_keys_and_types_name_the_key_and_the_file(tmp_path, data, message):
    path = _write(tmp_path / "bad.yaml", {"models": ["a"], **data})
    with pytest.raises(MergeError) as e:
        load_recipe(path)
    assert str(e.value).startswith(f"Recipe {path}") and message in str(e.value)


def _mergekit(models, weights, **extra) -> dict:
    entries = [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, weights, strict=True)]
    return {"models": entries, "merge_method": "linear", **extra}


def test_mergekit_linear_recipe_gives_the_bytes_of_the_pmakit_call_and_the_closed_form(tmp_path):
    folders = save_models(tmp_path, 3)
    (base,) = save_models(tmp_path, 1, names=["base"], seed0=7)
    recipe = _mergekit(folders, [1.0, 3.0, 4.0], base_model=str(base), parameters={"normalize": True}, dtype="float32")
    path = _write(tmp_path / "mergekit.yml", recipe)
    assert main(["merge", path, "-o", str(tmp_path / "from-mergekit"), "--no-progress"]) == 0
    merge(folders, tmp_path / "from-pmakit", weights=[1, 3, 4], base_model=base, out_dtype="float32")
    mk, pm = tmp_path / "from-mergekit", tmp_path / "from-pmakit"
    assert (mk / "model.safetensors").read_bytes() == (pm / "model.safetensors").read_bytes()
    assert (mk / "config.json").read_bytes() == (pm / "config.json").read_bytes()
    written = yaml.safe_load((mk / "pmakit_recipe.yaml").read_text())
    assert written["weights"] == [1.0, 3.0, 4.0] and written["base_model"] == "../base"
    out = read_folder(mk)
    ref = reference(folders, [0.125, 0.375, 0.5])  # the closed form: w_i / sum(w), written as literals
    for name, expected in ref.items():
        bound = (
            4
            * EPS32
            * sum(w * read_folder(f)[name].double().abs() for w, f in zip([0.125, 0.375, 0.5], folders, strict=True))
        )
        assert ((out[name].double() - expected).abs() <= bound + 1e-30).all(), name


def test_mergekit_recipe_with_fp64_accumulation_is_the_fp64_sum_rounded_once(tmp_path):
    folders = save_models(tmp_path, 2)
    path = _write(
        tmp_path / "mk.yml",
        {**_mergekit(folders, [0.25, 0.75]), "accumulate_dtype": "float64", "output": str(tmp_path / "out")},
    )
    merge(**load_recipe(path))
    out, ref = read_folder(tmp_path / "out"), reference(folders, [0.25, 0.75])
    for name in ref:
        assert torch.equal(out[name], ref[name].float()), name


def test_mergekit_defaults_normalize_false_and_model_weights(tmp_path):
    path = _write(
        tmp_path / "mk.yml",
        {
            "merge_method": "linear",
            "models": [{"model": "a"}, {"model": "b", "parameters": {"weight": -0.5}}],
            "parameters": {"weight": 1.5, "normalize": False},
            "dtype": "bfloat16",
        },
    )
    kwargs = load_recipe(path)
    assert kwargs == {
        "models": ["a", "b"],
        "weights": [1.5, -0.5],
        "normalize": False,
        "out_dtype": "bfloat16",
        "config_source": "first",  # mergekit's donor without a base model: the first model
    }
    rule = MergeOptions(**{k: v for k, v in kwargs.items() if k != "models"}).rule()
    assert rule.weights_for(2) == [1.5, -0.5]


@pytest.mark.parametrize(
    "source, expected",
    [(None, "base"), ("base", "base"), ("{m0}", "first"), ("{m2}", "newest"), ("{base}", "base")],
)
def test_mergekit_tokenizer_source_maps_to_the_config_source(tmp_path, source, expected):
    folders = save_models(tmp_path, 3, tokenizer=True)
    (base,) = save_models(tmp_path, 1, names=["base"], seed0=5, tokenizer=True)
    for folder in [*folders, base]:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "marker": folder.name}))
    extra = {"base_model": str(base), "output": str(tmp_path / "out")}
    if source is not None:
        extra["tokenizer_source"] = source.format(m0=folders[0], m2=folders[2], base=base)
    kwargs = load_recipe(_write(tmp_path / "mk.yml", _mergekit(folders, [1, 1, 1], **extra)))
    assert kwargs["config_source"] == expected
    merge(**kwargs)
    donor = {"base": "base", "first": "m0", "newest": "m2"}[expected]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["marker"] == donor


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"merge_method": "slerp"}, "mergekit merge_method 'slerp' is not supported"),
        ({"tokenizer_source": "union"}, "`tokenizer_source: union` is not supported"),
        ({"tokenizer_source": "base"}, "`tokenizer_source: base` needs a `base_model`"),
        ({"tokenizer": {"source": "union"}}, "`tokenizer_source: union` is not supported"),
        (
            {"tokenizer": {"source": "base", "pad_to_multiple_of": 64}},
            "mergekit `tokenizer` key(s) pad_to_multiple_of",
        ),
        ({"parameters": {"density": 0.5}}, "mergekit parameter(s) density in `parameters`"),
        ({"slices": []}, "mergekit `slices` is not supported"),
        ({"chat_template": "chatml"}, "Unknown recipe key(s) chat_template"),
    ],
)
def test_mergekit_features_pmakit_lacks_are_refused_by_name(tmp_path, extra, message):
    path = _write(tmp_path / "mk.yml", {**_mergekit(["a", "b"], [1, 1]), **extra})
    with pytest.raises(MergeError) as e:
        load_recipe(path)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "models, message",
    [
        (
            [{"model": "a", "parameters": {"weight": [0, 0.5, 1]}}],
            "`models[0].parameters.weight` (a) must be a number",
        ),
        ([{"model": "a", "parameters": {"weight": [{"filter": "lm_head", "value": 0}]}}], "per-tensor or per-layer"),
        ([{"model": "a"}], "`models[0]` (a) has no `parameters.weight`"),
        ([{"model": "a", "parameters": {"weight": 1, "density": 0.2}}], "density in `models[0].parameters`"),
        ([{"model": 3, "parameters": {"weight": 1}}], "`models[0].model` must be a folder or Hub id"),
        ([{"model": "a", "lora": "x", "parameters": {"weight": 1}}], "Unknown key(s) lora in `models[0]` (a)"),
        ([], "`models` must be a non-empty list"),
    ],
)
def test_bad_mergekit_model_entries_name_the_entry(tmp_path, models, message):
    path = _write(tmp_path / "mk.yml", {"merge_method": "linear", "models": models})
    with pytest.raises(MergeError) as e:
        load_recipe(path)
    assert message in str(e.value)


def test_unsupported_method_exits_2_naming_it(tmp_path, capsys):
    path = _write(tmp_path / "mk.yml", {**_mergekit(["a", "b"], [1, 1]), "merge_method": "ties"})
    assert main(["merge", path, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pmakit: error: Recipe ") and "merge_method 'ties' is not supported" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_the_written_recipe_holds_what_shaped_the_result_not_where_it_went(tmp_path):
    folders = save_models(tmp_path, 2)
    (tmp_path / "out").mkdir()
    merge(folders, tmp_path / "out", overwrite=True, cache_dir=tmp_path / "cache", config_source="first", threads=1)
    written = yaml.safe_load((tmp_path / "out" / "pmakit_recipe.yaml").read_text())
    assert written == {
        "models": ["../m0", "../m1"],  # relative to the recipe's folder: no user directory layout
        "algo": "sma",
        "config_source": "first",
        "accumulate_dtype": "float32",
        "max_shard_size": 5_000_000_000,
        "save_tokenizer": True,
    }
    loaded = load_recipe(tmp_path / "out" / "pmakit_recipe.yaml")
    assert loaded == {**written, "models": [str(tmp_path / "out" / "../m0"), str(tmp_path / "out" / "../m1")]}


LAUGHS = "models:\n- &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"- &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)
LOAD = "import sys\nfrom pmakit.merging import load_recipe\nload_recipe(sys.argv[1])\n"


def test_yaml_aliases_are_refused_so_a_billion_laughs_recipe_ends_at_once(tmp_path):
    """About 1 KB of nested aliases names 9**9 values; a plain load then formats them into an error."""
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text(LAUGHS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", LOAD, str(recipe)], capture_output=True, text=True, env=env, timeout=240
    )
    assert out.returncode == 1 and "MergeError" in out.stderr
    assert f"Recipe {recipe} is not valid YAML (line 3, column 7): YAML aliases (*name) are not allowed" in out.stderr


def test_values_in_recipe_errors_are_bounded(tmp_path):
    recipe = tmp_path / "long.yaml"
    recipe.write_text(yaml.safe_dump({"models": [[f"{i}{j}" + "x" * 10_000 for j in range(10)] for i in range(10)]}))
    with pytest.raises(MergeError, match=r"`models` must be a list of folders or Hub ids, got \[\[") as info:
        load_recipe(recipe)
    assert len(str(info.value)) < 400
