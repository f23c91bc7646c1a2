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


def test_every_block_says_what_it_is():
    for page in PAGES:
        for block in fenced_blocks(page):
            assert block.lang in LANGUAGES, (
                f"{block.where}: fence the block as one of {', '.join(LANGUAGES)} (got {block.lang!r})"
            )


@pytest.fixture(scope="session")
def workspace_template(tmp_path_factory) -> Path:
    """The folders the snippets read, built once: a run with checkpoints and PMA folders, fine-tunes, a base."""
    from tests.helpers.folders import save_models

    root = tmp_path_factory.mktemp("docs-workspace")
    run = root / "runs" / "pretrain"
    save_models(run, 10, names=[f"checkpoint-{1000 * i}" for i in range(1, 11)], tokenizer=True)
    save_models(run, 5, seed0=20, names=[f"pma-{2000 * i}" for i in range(1, 6)], tokenizer=True)
    shutil.copytree(run / "pma-10000", run / "pma")
    save_models(root, 3, seed0=40, names=["base", "ft-a", "ft-b"], tokenizer=True)
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
    monkeypatch.setattr(sys, "argv", ["train.py", "--output_dir", "runs/cli", "--max_steps", "8",
                                      "--pma_interleave_step", "2", "--pma_fused_num", "2", "--report_to", "none"])  # fmt: skip
    return target


def _namespace() -> dict:
    from tests.helpers.folders import make_tokenizer
    from tests.helpers.models import TokenDataset, tiny_llama

    train = TokenDataset(64, seed=1)
    return {"__name__": "__docs__", "model": tiny_llama(), "tokenizer": make_tokenizer(),
            "train": train, "ds": train, "val": TokenDataset(16, seed=2)}  # fmt: skip


def _run_python(block: Block, namespace: dict) -> None:
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(block.code, block.where, "exec"), namespace)


def _run_shell(block: Block) -> None:
    from pmakit.cli import main

    for words in shell_commands(block.code):
        if words[0] != "pmakit":
            check_command(words, block.where)
            continue
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(words[1:])
        assert code == 0, f"{block.where}: `{' '.join(words)}` exited {code}: {err.getvalue()[-2000:]}"


def _check_data(block: Block, workdir: Path) -> None:
    if block.lang == "json":
        json.loads(block.code)
        return
    data = yaml.safe_load(block.code)
    if isinstance(data, dict) and RECIPE_KEYS & data.keys():
        from pmakit import load_recipe

        path = workdir / f"recipe-{block.line}.yaml"
        path.write_text(block.code)
        assert load_recipe(path), f"{block.where}: the recipe loads as nothing"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_snippets_run(page: Path, workdir: Path):
    blocks = fenced_blocks(page)
    if any("org/" in b.code for b in blocks):
        _publish_fixtures(workdir)
    namespace = _namespace()
    for block in blocks:
        if block.lang == "python":
            _run_python(block, namespace)
        elif block.lang == "bash":
            _run_shell(block)
        elif block.lang in ("yaml", "json"):
            _check_data(block, workdir)
