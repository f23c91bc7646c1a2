"""`examples/sft_trl_from_pma.py`: PMA-init with TRL's SFTTrainer, in a tiny configuration end to end."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from examples import pretrain_pma, sft_trl_from_pma
from tests.examples.test_examples import TINY_MODEL


pytest.importorskip("trl")
pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def sft_results(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sft_trl")
    pretrain = [
        "--output_dir", str(root / "run"), "--max_steps", "8", "--warmup_steps", "2", "--learning_rate", "3e-3",
        "--per_device_train_batch_size", "4", "--block_size", "128", "--train_stride", "128",
        "--max_corpus_bytes", "24000", "--eval_steps", "8", "--logging_steps", "4", "--pma_eval", "False",
        "--pma_interleave_step", "2", "--pma_fused_num", "3", "--decay_steps", "0", "--long_decay_steps", "0",
        "--compare_algos", "ema", "--use_cpu", "True", *TINY_MODEL,
    ]  # fmt: skip
    sft = [
        "--run_dir", str(root / "run"), "--output_dir", str(root / "sft"), "--max_steps", "3", "--seeds", "0,1,2",
        "--max_chats", "48", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "64",
        "--max_length", "128", "--peak_steps", "2", "--warmup_steps", "1", "--pretrain_max_corpus_bytes", "24000",
        "--use_cpu", "True",
    ]  # fmt: skip
    try:
        pretrain_pma.main(pretrain)
        summary = sft_trl_from_pma.main(sft)
    finally:
        torch.set_num_threads(threads)
    return root, summary


def test_report_has_every_metric_for_both_starts(sft_results):
    root, summary = sft_results
    runs = json.loads((root / "sft" / "results.json").read_text())
    assert sorted(runs) == ["live", "pma"] and all(len(r) == 3 for r in runs.values())
    for run in runs["live"] + runs["pma"]:
        assert all(torch.isfinite(torch.tensor(v)) for v in run.values())
        assert run["final_sft_loss"] < run["initial_sft_loss"]  # fine-tuning learns the chats
    report = (root / "sft" / "results.md").read_text()
    assert summary["table"] in report and "grad-norm peak, first 2 steps" in report and " ± " in report
    # the held-out losses before SFT depend on the start only, not on the seed
    for start in ("live", "pma"):
        assert len({r["initial_sft_loss"] for r in runs[start]}) == 1
        assert len({r["pretrain_loss_before"] for r in runs[start]}) == 1
    assert runs["live"][0]["initial_sft_loss"] != runs["pma"][0]["initial_sft_loss"]


def test_initial_sft_loss_is_the_completion_token_loss(sft_results):
    """Recompute the held-out SFT loss of the PMA start by hand: cross-entropy on answer bytes only."""
    root, _ = sft_results
    args, ca = sft_trl_from_pma.parse_args(["--max_chats", "48", "--max_length", "128"])
    _, heldout = sft_trl_from_pma.chat_datasets(ca)
    tokenizer = sft_trl_from_pma.chat_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(root / "run" / "pma").eval()
    total, count = 0.0, 0
    for chat in heldout:
        prompt = tokenizer.apply_chat_template(chat["prompt"], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(chat["prompt"] + chat["completion"], tokenize=False)
        assert full.startswith(prompt) and full.endswith("</s>")
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        assert len(ids) <= 128  # nothing truncated
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        targets = torch.tensor(ids[1:])
        losses = torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="none")
        total += losses[start - 1 :].sum().item()
        count += len(ids) - start
    runs = json.loads((root / "sft" / "results.json").read_text())
    assert runs["pma"][0]["initial_sft_loss"] == pytest.approx(total / count, rel=1e-4)
