"""Merges that are stopped, run twice at once, or given paths with ``~``: nothing lost, nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pmakit.cli import main
from pmakit.merging import MergeError, merge
from pmakit.merging.recipe import load_recipe
from tests.helpers.folders import read_folder, save_models


ROOT = Path(__file__).resolve().parents[2]

# A real `pmakit` process whose first shard write waits until the file `release` appears, so that
# the test can signal it (or start a second merge) while the output is half written.
_BLOCKED_MERGE = """
import pathlib, sys, time
from pmakit.io.safetensors import ShardWriter
started, release = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
real_write = ShardWriter.write
def write(self, tensor, offset, data):
    real_write(self, tensor, offset, data)
    started.touch()
    while not release.exists():
        time.sleep(0.01)
ShardWriter.write = write
from pmakit.cli import main
sys.exit(main(sys.argv[3:]))
"""


class BlockedMerge:
    """``pmakit average`` in a subprocess, stopped after its first write until `release` is called."""

    def __init__(self, tmp_path: Path, folders: list[Path], output: Path) -> None:
        script = tmp_path / "blocked_merge.py"
        script.write_text(_BLOCKED_MERGE)
        self.started, self.release_file = tmp_path / "started", tmp_path / "release"
        self.scratch = tmp_path / "system-tmp"
        self.scratch.mkdir(exist_ok=True)
        path = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
        env = {**os.environ, "PYTHONPATH": path, "TMPDIR": str(self.scratch)}
        argv = ["average", *map(str, folders), "-o", str(output), "--threads", "1", "--no-progress"]
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(self.started), str(self.release_file), *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while not self.started.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"the merge did not start: {self.proc.communicate()}")
            time.sleep(0.02)

    def release(self) -> None:
        self.release_file.touch()

    def finish(self) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=120)
        return self.proc.returncode, out, err


def _leftovers(folder: Path, name: str = "out") -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((f"_{name}.", f".{name}.")))


def test_sigterm_mid_merge_cleans_up_and_exits_143(tmp_path):
    folders = save_models(tmp_path, 2)
    job = BlockedMerge(tmp_path, folders, tmp_path / "out")
    assert len(_leftovers(tmp_path)) == 2  # the half-written `_out.*.tmp` and the lock file
    job.proc.send_signal(signal.SIGTERM)
    code, _, err = job.finish()
    assert code == 143
    assert err == "pmakit: terminated (SIGTERM); no output was left behind\n"
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    assert list(job.scratch.iterdir()) == []  # no `pmakit-merge-*` scratch folder either


def test_second_merge_into_the_same_output_is_refused_naming_the_holder(tmp_path, capsys):
    folders = save_models(tmp_path, 2)
    job = BlockedMerge(tmp_path, folders, tmp_path / "out")
    code = main(["average", str(folders[1]), str(folders[0]), "-o", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"pid {job.proc.pid}" in err and "being written by another process" in err
    with pytest.raises(MergeError, match=f"pid {job.proc.pid}"):
        merge(folders, tmp_path / "out", overwrite=True)
    job.release()
    assert job.finish()[0] == 0
    assert _leftovers(tmp_path) == []  # the lock file goes with its holder
    a, b, out = read_folder(folders[0]), read_folder(folders[1]), read_folder(tmp_path / "out")
    assert all(((out[k] - (a[k] + b[k]) / 2).abs() <= 1e-6).all() for k in out)


def test_a_killed_merge_leaves_temporaries_that_the_next_run_removes(tmp_path):
    folders = save_models(tmp_path, 2)
    job = BlockedMerge(tmp_path, folders, tmp_path / "out")
    job.proc.kill()
    job.finish()
    stale = _leftovers(tmp_path)
    assert any(n.endswith(".tmp") for n in stale)
    for name in stale:  # a rerun comes later than the sweep's grace period for just-made folders
        os.utime(tmp_path / name, (time.time() - 60, time.time() - 60))
    (tmp_path / "_other.abcdefgh.tmp").mkdir()  # not this output's: never touched
    assert main(["average", *map(str, folders), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    assert _leftovers(tmp_path) == [] and (tmp_path / "_other.abcdefgh.tmp").is_dir()


def test_home_folder_is_expanded_in_the_api_recipes_and_the_cli(tmp_path, monkeypatch):
    folders = save_models(tmp_path, 2)
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    merge(folders, "~/api")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"models": [str(f) for f in folders], "output": "~/recipe"}))
    assert main(["merge", str(recipe), "--no-progress"]) == 0
    assert main(["average", *map(str, folders), "-o", "~/cli", "--no-progress"]) == 0
    assert all((home / name / "model.safetensors").is_file() for name in ("api", "recipe", "cli"))
    assert list(cwd.iterdir()) == []  # no literal `./~`


@pytest.mark.parametrize("kind", ["pma", "checkpoint"])
def test_recipe_kind_with_models_is_refused_naming_the_key(tmp_path, kind):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"models": ["a", "b"], "kind": kind, "output": "out"}))
    with pytest.raises(MergeError, match=f"`kind: {kind}`.*no effect on `models`"):
        load_recipe(recipe)


def test_recipe_kind_pma_state_with_models_is_kept(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"models": ["a", "b"], "kind": "pma-state"}))
    assert load_recipe(recipe)["kind"] == "pma-state"


def test_pma_kind_with_model_folders_is_refused(tmp_path):
    folders = save_models(tmp_path, 2)
    with pytest.raises(MergeError, match="kind='pma'.*run_dir"):
        merge(folders, tmp_path / "out", kind="pma")


def _config(folder: Path) -> dict:
    import json

    return json.loads((folder / "config.json").read_text())


def _head(folder: Path) -> torch.Tensor:
    """The LM head a model folder really uses: its own, or (tied) its embedding matrix."""
    tensors = read_folder(folder)
    return tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])


@pytest.mark.parametrize("ties", [(False, True), (True, False), (False, False)])
def test_mixed_tying_keeps_every_input_head(tmp_path, ties):
    """Untied inputs keep their averaged heads whatever the newest input or the base ties (both orders)."""
    folders = [save_models(tmp_path / f"in{i}", 1, tie=tie, seed0=i)[0] for i, tie in enumerate(ties)]
    base = save_models(tmp_path / "base", 1, tie=True, seed0=7)[0]
    out = merge(folders, tmp_path / "out", weights=[0.25, 0.75], base_model=str(base)).output
    expected = 0.25 * _head(folders[0]).double() + 0.75 * _head(folders[1]).double()
    merged = read_folder(out)
    assert (merged["lm_head.weight"].double() - expected).abs().max() <= 1e-6
    assert _config(out)["tie_word_embeddings"] is False
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, merged["lm_head.weight"])
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_all_tied_inputs_stay_tied_under_an_untied_base(tmp_path):
    folders = save_models(tmp_path, 2, tie=True)
    base = save_models(tmp_path / "base", 1, tie=False, seed0=7)[0]
    out = merge(folders, tmp_path / "out", base_model=str(base)).output
    assert "lm_head.weight" not in read_folder(out) and _config(out)["tie_word_embeddings"] is True


def test_backbone_only_keeps_the_base_tying(tmp_path):
    folders = save_models(tmp_path, 2, tie=False)
    base = save_models(tmp_path / "base", 1, tie=True, seed0=7)[0]
    out = merge(folders, tmp_path / "out", base_model=str(base), backbone_only=True).output
    merged, b = read_folder(out), read_folder(base)
    assert "lm_head.weight" not in merged and _config(out)["tie_word_embeddings"] is True
    assert torch.equal(merged["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def _constant_folders(root: Path, values: list[float], dtype=torch.float32) -> list[Path]:
    """One-tensor model folders holding ``value`` everywhere (real safetensors files)."""
    from safetensors.torch import save_file

    folders = []
    for i, value in enumerate(values):
        folder = root / f"c{i}"
        folder.mkdir(parents=True)
        save_file(
            {"w": torch.full((4, 8), value, dtype=dtype), "ok": torch.ones(3, dtype=dtype)},
            folder / "model.safetensors",
        )
        folders.append(folder)
    return folders


def test_narrowing_to_float16_overflow_is_refused_naming_the_tensor(tmp_path, capsys):
    folders = _constant_folders(tmp_path, [7e4, 7e4])
    with pytest.raises(MergeError, match="Tensor 'w' overflows F16 when written.*out_dtype"):
        merge(folders, tmp_path / "out", out_dtype="float16")
    argv = ["average", *map(str, folders), "-o", str(tmp_path / "out"), "--out-dtype", "float16", "--no-progress"]
    assert main(argv) == 2
    assert "Tensor 'w' overflows F16" in capsys.readouterr().err and not (tmp_path / "out").exists()
    merge(folders, tmp_path / "wide", out_dtype="float32")  # a wide enough dtype is fine
    assert read_folder(tmp_path / "wide")["w"].eq(7e4).all()


def test_extrapolating_half_precision_merge_overflow_is_refused(tmp_path):
    folders = _constant_folders(tmp_path, [4e4, 4e4], dtype=torch.float16)
    with pytest.raises(MergeError, match="Tensor 'w' overflows F16"):
        merge(folders, tmp_path / "out", weights=[1, 1], normalize=False)
    assert not (tmp_path / "out").exists()


def test_all_zero_and_extreme_weights_warn_naming_the_weights(tmp_path):
    folders = _constant_folders(tmp_path, [1.0, 2.0])
    with pytest.warns(UserWarning, match=r"Every weight is zero \(weights \[0.0, 0.0\]\)"):
        merge(folders, tmp_path / "zero", weights=[0, 0], normalize=False)
    with pytest.warns(UserWarning, match=r"weights \[1.0, -0.999999\] extrapolate far beyond the inputs"):
        merge(folders, tmp_path / "far", weights=[1, -0.999999])
    expected = (1 * 1.0 - 0.999999 * 2.0) / (1 - 0.999999)
    assert abs(read_folder(tmp_path / "far")["w"].double()[0, 0].item() - expected) <= abs(expected) * 1e-3


def test_inputs_of_different_float_dtypes_need_out_dtype(tmp_path):
    folders = [save_models(tmp_path / "a", 1)[0], save_models(tmp_path / "b", 1, dtype=torch.bfloat16, seed0=1)[0]]
    with pytest.raises(MergeError, match=r"Tensor '.*' is F32 in .*a/m0.* but BF16 in .*b/m0.*out_dtype"):
        merge(folders, tmp_path / "out")
    out = merge(folders, tmp_path / "out", out_dtype="float32").output
    merged, a, b = read_folder(out), read_folder(folders[0]), read_folder(folders[1])
    assert all(((merged[k].double() - (a[k].double() + b[k].double()) / 2).abs() <= 1e-6).all() for k in merged)


def test_ema_weights_are_explained_and_printed_where_users_choose_them(tmp_path, capsys):
    folders = save_models(tmp_path, 4)
    with pytest.raises(SystemExit):
        main(["average", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "not always newest most" in help_text and "0.512, 0.128, 0.16, 0.2" in help_text
    assert "may be negative" in help_text
    assert main(["average", *map(str, folders), "--algo", "ema", "--alpha", "0.2", "--dry-run"]) == 0
    printed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:5]]
    assert [float(w) for w in printed] == pytest.approx([0.512, 0.128, 0.16, 0.2])
    out = merge(folders, tmp_path / "out", algo="ema", alpha=0.2).output
    card = (out / "README.md").read_text()
    assert all(f"| {w} |" in card for w in ("0.512", "0.128", "0.16", "0.2"))


def test_merged_folder_recipe_runs_from_anywhere(tmp_path, monkeypatch):
    """The recipe's ``../`` inputs are read relative to the recipe file, not the working directory."""
    folders = save_models(tmp_path / "run", 2)
    merge(folders, tmp_path / "merged" / "out", base_model=str(folders[0]))
    recipe = yaml.safe_load((tmp_path / "merged" / "out" / "pmakit_recipe.yaml").read_text())
    assert recipe["models"] == ["../../run/m0", "../../run/m1"] and recipe["base_model"] == "../../run/m0"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["merge", str(tmp_path / "merged" / "out" / "pmakit_recipe.yaml"), "-o", "again"]) == 0
    assert read_folder(elsewhere / "again").keys() == read_folder(tmp_path / "merged" / "out").keys()
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            read_folder(elsewhere / "again").values(), read_folder(tmp_path / "merged" / "out").values(), strict=True
        )
    )


@pytest.mark.parametrize(
    "python, cli",
    [
        ("pass overwrite=True to replace it", "pass --overwrite to replace it"),
        ("or pass allow_nonfinite=True.", "or pass --allow-nonfinite."),
        ("`kind='pma'` selects", "`--pma` selects"),
        ("try accumulate_dtype='float64' or", "try --accumulate-dtype float64 or"),
        ("with normalize=False", "with --no-normalize"),
        ("a wider out_dtype=... or", "a wider --out-dtype DTYPE or"),
        ("not_a_field=True and output=x", "not_a_field=True and output=x"),
    ],
)
def test_cli_wording_names_flags(python, cli):
    from pmakit.cli import cli_wording

    assert cli_wording(python) == cli


def test_errors_name_flags_in_the_cli_and_python_names_in_python(tmp_path, capsys):
    folders = _constant_folders(tmp_path, [7e4, 7e4])
    with pytest.raises(MergeError) as python:
        merge(folders, tmp_path / "out", out_dtype="float16")
    assert "out_dtype=..." in str(python.value) and "--out-dtype" not in str(python.value)
    assert main(["average", *map(str, folders), "-o", str(tmp_path / "out"), "--out-dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert "--out-dtype DTYPE" in err and "out_dtype" not in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match=r"pass overwrite=True"):
        merge(folders, tmp_path / "full")
    assert main(["average", *map(str, folders), "-o", str(tmp_path / "full"), "--no-progress"]) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
