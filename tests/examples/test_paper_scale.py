"""`examples/paper_scale.py`: its size presets, the stdlib corpus, and `--size tiny` end to end."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from examples import bytelm, decay_merge, paper_scale
from pmakit import ALGORITHMS


# The CPU run of the scale trend (16.0M parameters), as it was started.
CPU_RUN = [
    "--output_dir", "runs/scale_cpu16m", "--corpus", "docstrings", "--hidden_size", "384", "--num_layers", "9",
    "--num_heads", "6", "--intermediate_size", "1024", "--max_steps", "1000", "--windows", "100,200",
    "--decay_shapes", "linear", "--logging_steps", "50", "--report_md", "runs/scale_cpu16m/results.md",
    "--plot", "runs/scale_cpu16m/decay_merge.png",
]  # fmt: skip


def _llama_params(hidden: int, layers: int, intermediate: int, vocab: int = 259) -> int:
    """Closed form: per layer q/k/v/o (4 d^2), SwiGLU (3 d i) and two RMSNorms; tied embedding; final norm."""
    return layers * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) + vocab * hidden + hidden


def test_size_presets():
    _, paper, _ = paper_scale.settings("paper", [])
    assert 100e6 <= _llama_params(paper.hidden_size, paper.num_layers, paper.intermediate_size) <= 150e6
    assert paper_scale.count_params(paper_scale.model_config(paper)) == _llama_params(1024, 10, 2816) == 128_737_280
    assert (paper.corpus, paper.block_size, paper.decay_shapes) == ("stdlib", 512, "linear")

    # `--size cpu` is the running CPU configuration, setting for setting
    keep = CPU_RUN[CPU_RUN.index("--report_md") :] + CPU_RUN[:2]
    args, ex, windows = paper_scale.settings("cpu", keep)
    ref_args, ref_ex, ref_windows = decay_merge.parse_args(CPU_RUN)
    assert (args, ex, windows) == (ref_args, ref_ex, ref_windows)
    assert (args.learning_rate, args.per_device_train_batch_size, args.pma_interleave_step) == (3e-3, 16, 10)
    assert paper_scale.count_params(paper_scale.model_config(ex)) == _llama_params(384, 9, 1024) == 16_032_000

    # tiny and paper store only the samples the longest window merges; nothing else changes
    args, ex, windows = paper_scale.settings("tiny", ["--pma_interleave_step", "10", "--windows", "20,40"])
    assert (args.pma_start_step, args.pma_save, args.pma_sample_store_limit) == (80, False, 4)
    with pytest.raises(ValueError, match="--windows"):
        paper_scale.settings("tiny", ["--windows", "7"])


def test_stdlib_corpus():
    root = Path(sysconfig.get_paths()["stdlib"])
    data = bytelm.load_corpus("stdlib")
    assert len(data) > 5_000_000  # about 11 MB with CPython 3.11
    # source files as raw bytes, in sorted path order, each followed by a blank line
    first = min((p for p in root.iterdir() if p.suffix in (".py", ".txt", ".rst") and p.is_file()), key=str)
    assert data.startswith(first.read_bytes() + b"\n\n")
    assert (root / "json" / "decoder.py").read_bytes() in data
    # the parts the docstrings corpus skips are skipped too: tests, GUI toolkits
    for skipped in (root / "tkinter" / "constants.py", root / "unittest" / "test" / "test_case.py"):
        if skipped.is_file():
            assert skipped.read_bytes()[:2000] not in data
    assert bytelm.load_corpus("stdlib", max_bytes=1000) == data[:1000]


@pytest.mark.skipif("decay" not in ALGORITHMS, reason="needs the decay rule and the sample store")
def test_paper_scale_tiny(tmp_path):
    threads = torch.get_num_threads()
    out = tmp_path / "run"
    try:
        torch.set_num_threads(1)  # a tiny model on a shared machine: more threads only add contention
        summary = paper_scale.main(["--size", "tiny", "--output_dir", str(out), "--use_cpu"])
    finally:
        torch.set_num_threads(threads)
    assert (out / "paper_scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # only the samples of the longest window were stored, and no pma-N folders written
    assert sorted(p.name for p in (out / "pma-samples").iterdir()) == [f"step-{s}" for s in (105, 110, 115, 120)]
    assert not list(out.glob("pma-[0-9]*"))

    # the live loss: the step-120 sample scored independently on the stdlib corpus's held-out bytes
    val = bytelm.ByteBlocks(bytelm.split_corpus(bytelm.load_corpus("stdlib", 60000), 0.1)[1], 128).truncate(8)
    live_model = AutoModelForCausalLM.from_pretrained(out / "pma-samples" / "step-120")
    assert summary["live"] == bytelm.validation_loss(live_model, val)

    # every rule/window row of the share table, each share from the losses the run reports
    report = (out / "results.md").read_text()
    live = summary["live"]
    assert f"| decay linear | {summary['decays']['linear@10']:.4f} | {summary['decays']['linear@20']:.4f} |" in report
    gains = 0
    for w in (10, 20):
        gain = live - summary["decays"][f"linear@{w}"]
        gains += gain > 0
        for rule in paper_scale.MERGE_RULES:
            cell = f"{(live - summary['merges'][f'{rule}@{w}']) / gain:.0%}" if gain > 0 else "n/a"
            assert f"| {w} | {rule} | {'**' + cell + '**' if rule == 'sma' else cell} |" in report
    assert gains == 2  # the tiny preset's LR makes both decays gain, so the shares are numbers
    assert "python -m examples.paper_scale --size tiny" in report
    assert set(summary["merges"]) == {f"{r}@{w}" for r in paper_scale.MERGE_RULES for w in (10, 20)}


def test_estimate_fits_the_slot():
    """The paper size's documented estimate: under 6 minutes at 150 TFLOP/s, from its FLOPs and bytes."""
    args, ex, windows = paper_scale.settings("paper", [])
    found = paper_scale.estimate(args, ex, windows, 150.0, 11_000_000)
    tokens = 1500 + 300
    per_token = 6 * 128_737_280 + 12 * 10 * 512 * 1024
    assert found["train_s"] == pytest.approx(tokens * (per_token * 32 * 512 / 150e12 + 0.015))
    assert found["total_s"] < 360
