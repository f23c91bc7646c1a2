"""`MergeOptions`: defaults, validation naming the field, keywords and options objects, config source."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml

import pmakit
from pmakit.averaging import ALGORITHMS
from pmakit.merging import MergeError, MergeOptions, merge, plan_merge
from pmakit.merging.options import option_fields, recipe_fields
from tests.helpers.folders import read_folder, reference, save_models
from tests.helpers.merging import RUN_ONLY_OPTIONS


# The defaults of merge()'s keywords before the options object existed: they must not move.
OLD_DEFAULTS = {
    "last": None,
    "every": None,
    "start": None,
    "end": None,
    "kind": "checkpoint",
    "algo": "sma",
    "alpha": 0.2,
    "weights": None,
    "normalize": True,
    "base_model": None,
    "backbone_only": False,
    "backbone_patterns": None,
    "accumulate_dtype": "float32",
    "out_dtype": None,
    "max_shard_size": "5GB",
    "save_tokenizer": True,
    "overwrite": False,
    "allow_nonfinite": False,
    "allow_pickle": False,
    "push_to_hub": None,
    "private": False,
    "revision": None,
    "commit_message": None,
    "token": None,
    "cache_dir": None,
    "threads": None,
    "block_elements": 1 << 18,
    "reader": "mmap",
    "progress": False,
    "dry_run": False,
    "check_scopes": False,
    "scope_threshold": 0.1,
}


def test_defaults_are_the_old_keyword_defaults_and_every_field_has_help():
    options = MergeOptions()
    assert {k: getattr(options, k) for k in OLD_DEFAULTS} == OLD_DEFAULTS
    assert options.config_source is None and options.decay_shape is None
    assert set(OLD_DEFAULTS) | {"config_source", "decay_shape"} == {f.name for f in option_fields()}
    for f in option_fields():
        assert f.metadata["help"].endswith(".") and len(f.metadata["help"]) > 20, f.name
    assert {f.name for f in option_fields()} - {f.name for f in recipe_fields()} == RUN_ONLY_OPTIONS
    assert pmakit.MergeOptions is MergeOptions and callable(pmakit.merge)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(last=0), "`last` must be a positive integer, got 0"),
        (dict(every=-5), "`every` must be a positive integer"),
        (dict(start=-1), "`start` must be a step >= 0"),
        (dict(start=30, end=20), "start=30 > end=20"),
        (dict(last="3"), "`last` must be an integer or null, got '3' (str)"),
        (dict(last=True), "`last` must be an integer or null, got True (bool)"),
        (dict(alpha="0.2"), "`alpha` must be a number"),
        (dict(weights=[1, "x"]), "`weights` must be a list of a number or null"),
        (dict(weights=2.0), "`weights` must be a list of a number or null"),
        (dict(backbone_patterns="lm_head"), "`backbone_patterns` must be a list of a string or null"),
        (dict(normalize="yes"), "`normalize` must be true or false"),
        (dict(kind="ckpt"), "`kind` must be one of checkpoint, pma, pma-state; got 'ckpt'"),
        (dict(algo="median"), "`algo` must be one of sma, "),
        (dict(reader="aio"), "`reader` must be one of mmap, pread"),
        (dict(accumulate_dtype="float16"), "`accumulate_dtype` must be one of float32, float64"),
        (dict(config_source="oldest"), "`config_source` must be one of base, first, newest"),
        (dict(config_source="base"), "`config_source='base'` needs a `base_model`"),
        (dict(backbone_only=True), "backbone_only needs a base model"),
        (dict(algo="ema", alpha=1.5), "alpha` must lie in (0, 1)"),
        (dict(algo="weights"), "`algo='weights'` needs `weights`"),
        (dict(algo="ema", weights=[1, 2]), "`weights` cannot be combined with `algo='ema'`"),
        (dict(weights=[1, -1]), "sum to zero"),
        (dict(out_dtype="int8"), "`out_dtype` must be a floating dtype"),
        (dict(max_shard_size="5 parsecs"), "`max_shard_size`"),
        (dict(push_to_hub="a/b/c"), "`push_to_hub`: Hub repo id must be"),
        (dict(threads=0), "`threads` must be a positive integer"),
        (dict(scope_threshold=0), "`scope_threshold` must be positive"),
        (dict(token=123), "`token` must be a string or null"),
        (dict(decay_shape="cosine"), "decay_shape"),  # sma has no shape (and before the decay rule, no rule has)
    ],
)
def test_bad_settings_fail_when_built_and_name_the_field(settings, message):
    with pytest.raises(MergeError) as e:
        MergeOptions(**settings)
    assert message in str(e.value)


def test_values_are_normalised_and_the_token_stays_out_of_repr(tmp_path):
    options = MergeOptions(weights=[1, 3], backbone_patterns=["^lm_head\\."], base_model=tmp_path, token="hf_SECRET")
    assert options.weights == (1.0, 3.0) and all(type(w) is float for w in options.weights)
    assert options.backbone_patterns == ("^lm_head\\.",) and options.base_model == str(tmp_path)
    assert "hf_SECRET" not in repr(options) and "token" not in options.recipe_settings()
    assert options.rule().algo == "weights" and options.rule().weights_for(2) == [0.25, 0.75]
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.algo = "ema"
    with pytest.raises(MergeError, match="`alpha` must be a number"):
        dataclasses.replace(options, alpha=None)


def test_unknown_keywords_are_refused_by_name(tmp_path):
    folders = save_models(tmp_path, 2)
    with pytest.raises(MergeError, match="Unknown merge setting\\(s\\) algorithm, shards; the settings are"):
        merge(folders, tmp_path / "out", algorithm="ema", shards=2)
    with pytest.raises(MergeError, match="Unknown merge setting\\(s\\) nope"):
        plan_merge(folders, nope=1)
    with pytest.raises(MergeError, match="`options` must be a MergeOptions, got dict"):
        merge(folders, tmp_path / "out", options={"algo": "ema"})
    assert not (tmp_path / "out").exists()


def test_options_object_and_keywords_give_the_same_bytes(tmp_path):
    folders = save_models(tmp_path, 3)
    options = MergeOptions(algo="ema", alpha=0.3, threads=1)
    merge(folders, tmp_path / "kw", algo="ema", alpha=0.3, threads=1)
    merge(folders, tmp_path / "obj", options=options)
    merge(folders, tmp_path / "override", options=MergeOptions(algo="wma", threads=1), algo="ema", alpha=0.3)
    for name in ["model.safetensors", "config.json"]:
        kw = (tmp_path / "kw" / name).read_bytes()
        assert kw == (tmp_path / "obj" / name).read_bytes() == (tmp_path / "override" / name).read_bytes(), name
    recipes = [
        yaml.safe_load((tmp_path / out / "pmakit_recipe.yaml").read_text()) for out in ("kw", "obj", "override")
    ]
    assert not any("output" in r for r in recipes)  # where it went is not part of the recipe
    assert recipes[0] == recipes[1] == recipes[2] and recipes[0]["algo"] == "ema" and recipes[0]["alpha"] == 0.3


def test_a_bad_push_target_fails_before_any_input_is_read(tmp_path):
    with pytest.raises(MergeError, match="`push_to_hub`: Hub repo id must be"):
        merge([tmp_path / "does-not-exist"], tmp_path / "out", push_to_hub="bad repo id")
    assert not (tmp_path / "out").exists()


def _mark_configs(folders: list[Path]) -> None:
    for folder in folders:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "marker": folder.name}))


@pytest.mark.parametrize(
    "config_source, with_base, donor",
    [(None, False, "m2"), (None, True, "base"), ("first", True, "m0"), ("newest", True, "m2"), ("base", True, "base")],
)
def test_config_source_picks_the_input_that_gives_config_and_tokenizer(tmp_path, config_source, with_base, donor):
    folders = save_models(tmp_path, 3, tokenizer=True)
    (base,) = save_models(tmp_path, 1, names=["base"], seed0=9, tokenizer=True)
    _mark_configs([*folders, base])
    (folders[0] / "tokenizer_config.json").write_text(
        json.dumps({**json.loads((folders[0] / "tokenizer_config.json").read_text()), "marker": "m0"})
    )
    settings = {"base_model": base} if with_base else {}
    result = merge(folders, tmp_path / "out", config_source=config_source, **settings)
    assert result.plan.donor.path.name == donor
    assert json.loads((tmp_path / "out" / "config.json").read_text())["marker"] == donor
    tokenizer_marker = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()).get("marker")
    assert tokenizer_marker == ("m0" if donor == "m0" else None)
    assert f"from `../{donor}`" in (tmp_path / "out" / "README.md").read_text()


needs_decay = pytest.mark.skipif("decay" not in ALGORITHMS, reason="the decay rule is not in this pmakit yet")


@needs_decay
def test_decay_shape_reaches_the_rule_and_the_merge_matches_the_closed_form(tmp_path):
    folders = save_models(tmp_path, 4)
    c = math.cos(math.pi / 4)  # cosine shape d(x) = (1 + cos(pi x)) / 2; w_i = d((i-1)/4) - d(i/4)
    expected = [(1 - c) / 2, c / 2, c / 2, (1 - c) / 2]
    result = merge(folders, tmp_path / "out", algo="decay", decay_shape="cosine", threads=1)
    assert result.plan.weights == pytest.approx(expected, abs=1e-15)
    assert yaml.safe_load((tmp_path / "out" / "pmakit_recipe.yaml").read_text())["decay_shape"] == "cosine"
    out, ref, states = read_folder(tmp_path / "out"), reference(folders, expected), [read_folder(f) for f in folders]
    for name in ref:
        bound = 5 * 2.0**-24 * sum(w * s[name].double().abs() for w, s in zip(expected, states, strict=True))
        assert ((out[name].double() - ref[name]).abs() <= bound + 1e-30).all(), name
    with pytest.raises(MergeError, match="decay_shape"):
        MergeOptions(algo="decay", decay_shape="cube")
