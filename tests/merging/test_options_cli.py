"""The `average` and `merge` flags come from the MergeOptions fields; every old flag keeps its meaning."""

from __future__ import annotations

import pytest
import yaml

from pmakit import HubTarget
from pmakit.averaging import ALGORITHMS
from pmakit.cli import build_parser, main, options_from_args
from pmakit.merging import MergeOptions
from pmakit.merging.options import option_fields
from pmakit.merging.recipe import load_recipe
from tests.helpers.folders import read_folder, save_models


def _flags(field) -> list[tuple[str, str]]:
    """(flag, help) of every flag of a field."""
    meta = field.metadata
    if "const_flags" in meta:
        return [(flag, help_text) for flag, _, help_text in meta["const_flags"]]
    flag = meta.get("flag", "--" + field.name.replace("_", "-"))
    return [] if flag is None else [(flag, meta.get("flag_help", meta["help"]))]


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", ["average", "merge"])
def test_every_field_with_a_flag_is_in_the_help_with_its_help_text(capsys, command):
    text = _help(capsys, command)
    flagged = [f for f in option_fields() if _flags(f)]
    assert len(flagged) == len(option_fields()) - 1  # only the token has no flag
    for f in flagged:
        for flag, help_text in _flags(f):
            assert flag in text and " ".join(help_text.split()) in text, (f.name, flag)
    assert "--token" not in text


def test_inspect_takes_the_selection_flags_only(capsys):
    text = _help(capsys, "inspect")
    assert all(flag in text for flag in ("--last", "--every", "--start", "--end", "--pma", "--scopes"))
    assert "--pma-state" in text and "--allow-pickle" in text
    assert "--algo" not in text and "--push-to-hub" not in text


# The flags of `pmakit average` before MergeOptions, and the value each gave merge().
OLD_FLAGS = [
    (["--last", "3"], "last", 3),
    (["--every", "1000"], "every", 1000),
    (["--start", "10"], "start", 10),
    (["--end", "90"], "end", 90),
    (["--pma"], "kind", "pma"),
    (["--pma-state"], "kind", "pma-state"),
    (["--algo", "ema"], "algo", "ema"),
    (["--algo", "wma"], "algo", "wma"),
    (["--algo", "ema", "--alpha", "0.35"], "alpha", 0.35),
    (["--weights", "1", "2.5"], "weights", (1.0, 2.5)),
    (["--weights", "1", "-1", "--no-normalize"], "normalize", False),
    (["--base-model", "org/base"], "base_model", "org/base"),
    (["--base-model", "b", "--backbone-only"], "backbone_only", True),
    (
        ["--backbone-pattern", "^lm_head\\.", "--backbone-pattern", "embed"],
        "backbone_patterns",
        ("^lm_head\\.", "embed"),
    ),
    (["--accumulate-dtype", "float64"], "accumulate_dtype", "float64"),
    (["--out-dtype", "bfloat16"], "out_dtype", "bfloat16"),
    (["--max-shard-size", "500MB"], "max_shard_size", "500MB"),
    (["--no-tokenizer"], "save_tokenizer", False),
    (["--overwrite"], "overwrite", True),
    (["--allow-nonfinite"], "allow_nonfinite", True),
    (["--allow-pickle"], "allow_pickle", True),
    (["--dry-run"], "dry_run", True),
    (["--threads", "3"], "threads", 3),
    (["--no-progress"], "progress", False),
    (["--check-scopes"], "check_scopes", True),
    (["--scope-threshold", "0.25"], "scope_threshold", 0.25),
]
# Given no flag, the command line meant these values (a progress bar, unlike the Python API).
OLD_CLI_DEFAULTS = {"kind": "checkpoint", "algo": "sma", "alpha": 0.2, "normalize": True, "save_tokenizer": True}


@pytest.mark.parametrize("argv, name, value", OLD_FLAGS, ids=[" ".join(a) for a, _, _ in OLD_FLAGS])
def test_old_average_flags_parse_to_the_same_values(argv, name, value):
    args = build_parser().parse_args(["average", "run", "-o", "out", *argv])
    options = options_from_args(args)
    assert getattr(options, name) == value and type(getattr(options, name)) is type(value)
    untouched = {k: v for k, v in OLD_CLI_DEFAULTS.items() if k != name and f"--{k}" not in argv}
    assert {k: getattr(options, k) for k in untouched} == untouched
    assert options.progress is (name != "progress")


HUB_FLAGS = [
    (["--push-to-hub", "me/model"], HubTarget("me/model")),
    (["--push-to-hub", "me/model", "--private"], HubTarget("me/model", private=True)),
    (["--push-to-hub", "me/model", "--revision", "v2"], HubTarget("me/model", revision="v2")),
    (["--push-to-hub", "me/model", "--commit-message", "merged"], HubTarget("me/model", commit_message="merged")),
    (["--private", "--revision", "v2"], None),  # no push: the Hub flags alone do nothing, as before
]


@pytest.mark.parametrize("argv, target", HUB_FLAGS, ids=[" ".join(a) for a, _ in HUB_FLAGS])
def test_hub_flags_build_one_target_without_a_warning(argv, target, recwarn):
    options = options_from_args(build_parser().parse_args(["average", "run", "-o", "out", *argv]))
    assert options.push_to_hub == target
    assert (options.private, options.revision, options.commit_message) == (False, None, None)
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]  # the flags are not deprecated


def test_no_flags_gives_the_defaults_with_a_progress_bar():
    options = options_from_args(build_parser().parse_args(["average", "run", "-o", "out"]))
    assert options == MergeOptions(progress=True)


def test_new_flags_parse(tmp_path):
    argv = ["--config-source", "first", "--reader", "pread", "--block-elements", "4096", "--cache-dir", str(tmp_path)]
    options = options_from_args(build_parser().parse_args(["average", "run", "-o", "out", *argv]))
    assert (options.config_source, options.reader, options.block_elements) == ("first", "pread", 4096)
    assert options.cache_dir == str(tmp_path)


def test_bad_flag_values_exit_2_naming_the_field(tmp_path, capsys):
    assert main(["average", "run", "-o", str(tmp_path / "o"), "--algo", "weights"]) == 2
    assert "`--algo weights` needs `weights`" in capsys.readouterr().err  # flags, not Python names
    assert main(["average", "run", "-o", str(tmp_path / "o"), "--algo", "ema", "--weights", "1", "2"]) == 2
    assert "`weights` cannot be combined with `--algo ema`" in capsys.readouterr().err
    assert main(["average", "run", "-o", str(tmp_path / "o"), "--push-to-hub", "a/b/c"]) == 2
    assert "`push_to_hub`: Hub repo id" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["average", "run", "--algo", "median"])
    assert e.value.code == 2 and "invalid choice: 'median'" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    from pmakit import __version__

    assert e.value.code == 0 and capsys.readouterr().out.strip() in (f"pmakit {__version__}", "pmakit (not installed)")


def test_merge_flags_override_the_recipe(tmp_path, capsys):
    folders = save_models(tmp_path, 2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"models": [str(f) for f in folders], "algo": "ema", "alpha": 0.5}))
    out = tmp_path / "out"
    assert main(["merge", str(recipe), "-o", str(out), "--out-dtype", "float64", "--no-progress"]) == 0
    written = yaml.safe_load((out / "pmakit_recipe.yaml").read_text())
    assert (written["algo"], written["alpha"], written["out_dtype"]) == ("ema", 0.5, "float64")
    assert all(t.dtype.is_floating_point and t.element_size() == 8 for t in read_folder(out).values())
    assert main(["merge", str(recipe), "-o", str(out), "--no-progress"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["merge", str(recipe), "-o", str(out), "--overwrite", "--algo", "sma", "--no-progress"]) == 0
    assert "alpha" not in yaml.safe_load((out / "pmakit_recipe.yaml").read_text())
    args = build_parser().parse_args(["merge", str(recipe), "--push-to-hub", "me/x", "--threads", "2"])
    assert (options_from_args(args).push_to_hub, options_from_args(args).threads) == (HubTarget("me/x"), 2)
    pushing = {"models": ["a"], "push_to_hub": {"repo_id": "me/x", "private": True, "revision": "v1"}}
    recipe.write_text(yaml.safe_dump(pushing))
    args = build_parser().parse_args(["merge", str(recipe), "--revision", "v2", "--commit-message", "m"])
    settings = {k: v for k, v in load_recipe(recipe).items() if k != "models"}
    target = HubTarget("me/x", private=True, revision="v2", commit_message="m")  # the flags over the recipe's
    assert options_from_args(args, settings).push_to_hub == target


def test_algo_choices_are_the_averaging_rules(capsys):
    assert "{" + ",".join(ALGORITHMS) + "}" in _help(capsys, "average")


@pytest.mark.skipif("decay" not in ALGORITHMS, reason="the decay rule is not in this pmakit yet")
def test_decay_shape_flag():
    args = build_parser().parse_args(["average", "r", "--algo", "decay", "--decay-shape", "1-sqrt"])
    assert options_from_args(args).rule().decay_shape == "1-sqrt"
