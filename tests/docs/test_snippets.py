"""Every code block of the README and the docs pages runs (python, pmakit commands) or is checked.

Each page runs in its own temporary folder, prepared with what the snippets name: tiny local
models saved as `runs/pretrain/checkpoint-N` and `pma-N` folders, fine-tunes `ft-a`/`ft-b` and a
`base`, a model `model`, a `tokenizer` and datasets `train`/`val`/`ds` in the namespace, and a
local Hub (`tests.helpers.hub_server`) holding `org/base`, `org/ft-a` and `org/ft-b` (branch `v2`).
Python blocks of one page share a namespace and run in order, then shell blocks see their outputs.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from tests.docs.snippets import LANGUAGES, ROOT, Block, check_command, documented_pages, fenced_blocks, shell_commands


PAGES = documented_pages()
RECIPE_KEYS = {"models", "run_dir", "output", "merge_method"}
# Flags whose inputs (the PMA average in sharded optimizer states) only a multi-process FSDP/ZeRO run
# writes; tests/merging builds those. Here such a command's flags are parsed, not run.
NEEDS_TRAINING_STATE = {"--pma-state"}


def test_every_block_says_what_it_is():
    for page in PAGES:
        for block in fenced_blocks(page):
            assert block.lang in LANGUAGES, (
                f"{block.where}: fence the block as one of {', '.join(LANGUAGES)} (got {block.lang!r})"
            )


def _save_lora_run(root: Path) -> None:
    """A base model at `path/to/base` and three LoRA adapters of it as `run/pma-1000..3000`."""
    from peft import LoraConfig, get_peft_model

    from tests.helpers.folders import save_models
    from tests.helpers.models import tiny_llama

    save_models(root / "path" / "to", 1, names=["base"], tokenizer=True)
    for step in (1000, 2000, 3000):
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(tiny_llama(seed=0), config).save_pretrained(root / "run" / f"pma-{step}")


@pytest.fixture(scope="session")
def workspace_template(tmp_path_factory) -> Path:
    """The folders the snippets read, built once: a run with checkpoints and PMA folders, fine-tunes, a base."""
    from tests.helpers.folders import save_models

    root = tmp_path_factory.mktemp("docs-workspace")
    run = root / "runs" / "pretrain"
    save_models(run, 10, names=[f"checkpoint-{1000 * i}" for i in range(1, 11)], tokenizer=True)
    save_models(run, 5, seed0=20, names=[f"pma-{2000 * i}" for i in range(1, 6)], tokenizer=True)
    shutil.copytree(run / "pma-10000", run / "pma")
    names = ["base", "ft-a", "ft-b", "ft-lr1e-5", "ft-lr3e-5", "ft-seed2", "ft/lr1e-5", "ft/lr3e-5", "ft/lr1e-4",
             "runs/a/checkpoint-2000", "runs/b/checkpoint-2000", "runs/a/final", "runs/b/final",
             "stage1/a", "stage1/b"]  # fmt: skip
    save_models(root, len(names), seed0=40, names=names, tokenizer=True)
    _save_lora_run(root)
    return root


def _publish_fixtures(workdir: Path) -> None:
    """Put `org/base`, `org/ft-a` and `org/ft-b` (also on branch `v2`) on the local Hub."""
    from huggingface_hub import HfApi

    api = HfApi()
    for name in ("base", "ft-a", "ft-b"):
        api.create_repo(f"org/{name}")
        api.upload_folder(folder_path=workdir / name, repo_id=f"org/{name}")
    api.create_branch("org/ft-b", branch="v2")


@pytest.fixture
def workdir(workspace_template, tmp_path, monkeypatch, local_hub) -> Path:
    target = tmp_path / "work"
    shutil.copytree(workspace_template, target)
    monkeypatch.chdir(target)
    monkeypatch.setenv("HF_TOKEN", local_hub.write_token)
    argv = "train.py --output_dir runs/cli --max_steps 8 --pma_interleave_step 2 --pma_fused_num 2 --report_to none"
    monkeypatch.setattr(sys, "argv", argv.split())  # what a launched `train.py` would be given
    return target


def _small_cnn():
    import torch

    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(4, 2),
    )  # fmt: skip


def _namespace() -> dict:
    """What the snippets call their own: a causal LM and tokenizer, datasets, and BatchNorm CNNs with a loader."""
    import torch

    from tests.helpers.folders import make_tokenizer
    from tests.helpers.models import TokenDataset, tiny_llama

    train = TokenDataset(64, seed=1)
    torch.manual_seed(0)
    cnns = [_small_cnn() for _ in range(4)]
    return {
        "__name__": "__docs__",
        "model": tiny_llama(),
        "template_model": tiny_llama(),
        "tokenizer": make_tokenizer(),
        **dict.fromkeys(["train", "ds", "train_ds", "shard_a"], train),
        "new_data": TokenDataset(32, seed=3),
        "val": TokenDataset(16, seed=2),
        **dict(zip(["cnn", "cnn_a", "cnn_b", "cnn_c"], cnns, strict=True)),
        "train_loader": [torch.randn(4, 3, 8, 8) for _ in range(3)],
    }


def _run_python(block: Block, namespace: dict) -> None:
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(block.code, block.where, "exec"), namespace)


def _run_shell(block: Block) -> None:
    from pmakit.cli import build_parser, main

    for words in shell_commands(block.code):
        if words[0] != "pmakit":
            check_command(words, block.where)
            continue
        if NEEDS_TRAINING_STATE & set(words):  # inputs only a real FSDP/ZeRO run writes: check the flags
            build_parser().parse_args(words[1:])
            continue
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(words[1:])
        assert code == 0, f"{block.where}: `{' '.join(words)}` exited {code}: {err.getvalue()[-2000:]}"


def _is_recipe(block: Block) -> bool:
    if block.lang != "yaml":
        return False
    data = yaml.safe_load(block.code)
    return isinstance(data, dict) and bool(RECIPE_KEYS & data.keys())


def _check_data(block: Block, workdir: Path) -> None:
    if block.lang == "json":
        json.loads(block.code)
        return
    yaml.safe_load(block.code)
    if _is_recipe(block):
        from pmakit import load_recipe

        path = workdir / f"recipe-{block.line}.yaml"
        path.write_text(block.code)
        assert load_recipe(path), f"{block.where}: the recipe loads as nothing"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_snippets_run(page: Path, workdir: Path):
    blocks = fenced_blocks(page)
    if any("org/" in b.code for b in blocks):
        _publish_fixtures(workdir)
    recipes = [b for b in blocks if _is_recipe(b)]
    if recipes:  # the page's first recipe is the `recipe.yaml` its commands name
        (workdir / "recipe.yaml").write_text(recipes[0].code)
    namespace = _namespace()
    for block in blocks:
        if block.lang == "python":
            _run_python(block, namespace)
        elif block.lang == "bash":
            _run_shell(block)
        elif block.lang in ("yaml", "json"):
            _check_data(block, workdir)


def test_module_commands_are_checked_as_the_scripts_they_run():
    check_command(["python", "-m", "examples.pretrain_pma", "--output_dir", "x", "--pma_fused_num", "5"], "here")
    check_command(["accelerate", "launch", "--num_processes", "2", "-m", "examples.accelerate_loop"], "here")
    with pytest.raises(AssertionError, match="has no flag --no_such_flag"):
        check_command(["python", "-m", "examples.pretrain_pma", "--no_such_flag", "1"], "here")
    with pytest.raises(AssertionError, match="examples/no_such_example.py does not exist"):
        check_command(["python", "-m", "examples.no_such_example"], "here")
