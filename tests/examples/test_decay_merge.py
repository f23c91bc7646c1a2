"""The decay-vs-merge experiment (`examples/decay_merge.py`) in a tiny configuration, end to end."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from examples import bytelm, decay_merge
from pmakit import ALGORITHMS


TINY = [
    "--max_steps", "40", "--warmup_steps", "10", "--windows", "10,20", "--pma_interleave_step", "5",
    "--max_corpus_bytes", "60000", "--hidden_size", "32", "--num_layers", "1", "--intermediate_size", "64",
    "--num_heads", "2", "--logging_steps", "1000", "--use_cpu", "--per_device_eval_batch_size", "8",
]  # fmt: skip


def _cosine_weights(n: int) -> list[float]:
    """WSM weights of the cosine decay, written out independently of pmakit."""
    d = [(1 + math.cos(math.pi * i / n)) / 2 for i in range(n + 1)]
    return [d[i - 1] - d[i] for i in range(1, n + 1)]


@pytest.mark.skipif("decay" not in ALGORITHMS, reason="needs the decay rule and the sample store")
def test_decay_merge_tiny(tmp_path):
    threads = torch.get_num_threads()
    out = tmp_path / "run"
    argv = [*TINY, "--output_dir", str(out), "--report_md", str(tmp_path / "r.md"), "--plot", str(tmp_path / "p.png")]
    try:
        torch.set_num_threads(1)  # a tiny model on a shared machine: more threads only add contention
        summary = decay_merge.main(argv)
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(summary["decays"]) == {f"{s}@{w}" for s in ("linear", "cosine", "1-sqrt") for w in (10, 20)}
    assert set(summary["merges"]) == {f"{r}@{w}" for r in decay_merge.MERGE_RULES for w in (10, 20)}
    # the samples of the last 20 steps were kept, and the fork checkpoints at T - L
    assert sorted(p.name for p in (out / "pma-samples").iterdir()) == [f"step-{s}" for s in (25, 30, 35, 40)]
    assert (out / "checkpoint-30" / "optimizer.pt").is_file() and (out / "checkpoint-20").is_dir()

    # an independent score of the decay:cosine merge of the last 4 samples: fp64 closed form, same validation bytes
    data = bytelm.load_corpus("topics", 60000)
    val = bytelm.ByteBlocks(bytelm.split_corpus(data, 0.1)[1], 128).truncate(8)
    folders = [out / "pma-samples" / f"step-{s}" for s in (25, 30, 35, 40)]
    models = [AutoModelForCausalLM.from_pretrained(f) for f in folders]
    merged = AutoModelForCausalLM.from_pretrained(folders[-1])
    with torch.no_grad():
        for name, param in merged.named_parameters():
            parts = [dict(m.named_parameters())[name].double() for m in models]
            param.copy_(sum(w * p for w, p in zip(_cosine_weights(4), parts, strict=True)).float())
    assert math.isclose(summary["merges"]["decay:cosine@20"], bytelm.validation_loss(merged, val), rel_tol=1e-5)
    assert summary["live"] == bytelm.validation_loss(models[-1], val)

    # the report's shares are (live - merge) / (live - decay), or n/a where the decay did not gain
    report = (tmp_path / "r.md").read_text()
    live = summary["live"]
    for rule in decay_merge.MERGE_RULES:
        gain = live - summary["decays"]["linear@20"]
        cell = f"{(live - summary['merges'][f'{rule}@20']) / gain:.0%}" if gain > 0 else "n/a"
        assert f"| 20 | {rule} | {'**' + cell + '**' if rule == 'sma' else cell} |" in report
    assert len({summary["decays"][f"{s}@20"] for s in ("linear", "cosine", "1-sqrt")}) == 3  # the shapes differ
