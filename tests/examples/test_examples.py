"""The headline example (`examples/pretrain_pma.py`) and PMA-init (`examples/sft_from_pma.py`), end to end.

Both scripts run in a tiny configuration through their own `main(argv)` (real `PmaTrainer`/`Trainer`
runs, real files); the checks read what they wrote back from disk.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from examples import bytelm, pretrain_pma, sft_from_pma


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_MODEL = ["--hidden_size", "32", "--num_layers", "1", "--num_heads", "2", "--intermediate_size", "64"]


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("pretrain") / "run"
    argv = [
        "--output_dir", str(out), "--max_steps", "16", "--warmup_steps", "2", "--learning_rate", "3e-3",
        "--per_device_train_batch_size", "4", "--block_size", "32", "--train_stride", "32",
        "--max_corpus_bytes", "24000", "--eval_steps", "4", "--logging_steps", "4",
        "--pma_interleave_step", "2", "--pma_fused_num", "4", "--decay_steps", "4", "--long_decay_steps", "8",
        "--use_cpu", "True",
        *TINY_MODEL,
    ]  # fmt: skip
    summary = pretrain_pma.main(argv)
    return out, summary


def test_bytes_match_the_saved_tokenizer():
    text = "PMA: average the weights, then decay? é ∑ \n"
    ids = bytelm.encode(text.encode("utf-8")).tolist()
    assert ids == bytelm.byte_tokenizer()(text, add_special_tokens=False)["input_ids"]
    assert max(ids) < bytelm.VOCAB_SIZE == 259 and min(ids) >= bytelm.BYTE_OFFSET


def test_split_is_deterministic_disjoint_and_complete():
    data = bytelm.load_corpus("topics", max_bytes=50_000)
    train, val = bytelm.split_corpus(data, 0.1)
    assert (train, val) == bytelm.split_corpus(data, 0.1)
    assert len(train) + len(val) == len(data) == 50_000
    assert 0.07 < len(val) / len(data) < 0.13
    # Every validation segment is a piece of the corpus that the training bytes do not contain.
    segment = val[:512]
    assert segment in data and segment not in train
    with pytest.raises(ValueError, match="val_fraction"):
        bytelm.split_corpus(data, 1.5)
    with pytest.raises(ValueError, match="--corpus"):
        bytelm.load_corpus("/no/such/corpus")


def test_pretrain_example_writes_table_plot_and_loadable_pma(pretrain_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, summary = pretrain_run
    names = [row["model"] for row in summary["rows"]]
    assert names[0] == "live weights" and names[1].startswith("PMA SMA")
    assert any(n.startswith("PMA EMA") for n in names) and any(n.startswith("PMA WMA") for n in names)
    assert names[-2].startswith("annealed: +4 steps") and names[-1].startswith("annealed: +8 steps")
    losses = {row["model"]: row["val_loss"] for row in summary["rows"]}
    live, annealed = losses["live weights"], losses[names[-2]]
    # Seeded and deterministic on CPU: the 4-step decay lowers the loss here, so every PMA row gets a share.
    assert live > annealed
    assert sorted(summary["share_of_decay_gain"]) == sorted(names[1:-2])
    for name, share in summary["share_of_decay_gain"].items():
        assert share == pytest.approx((live - losses[name]) / (live - annealed))

    # The folder the trainer exported is the SMA of the last 4 samples (steps 10..16), and it loads.
    assert summary["pma_check_max_abs_diff"] < 1e-5
    pma = AutoModelForCausalLM.from_pretrained(out / "pma")
    tokenizer = AutoTokenizer.from_pretrained(out / "pma")
    assert len(tokenizer) == bytelm.VOCAB_SIZE
    card = (out / "pma" / "README.md").read_text()
    assert "10, 12, 14, 16" in card
    val = bytelm.ByteBlocks(bytelm.split_corpus(bytelm.load_corpus("topics", 24_000), 0.1)[1], 32).truncate(32)
    assert bytelm.validation_loss(pma, val) == pytest.approx(losses[names[1]], abs=1e-9)

    # The annealed fork resumed the step-16 checkpoint (weights, optimizer state, data position) for 4 more steps.
    assert (out / "checkpoint-16" / "optimizer.pt").is_file()
    assert summary["rows"][-2]["weights"] == "steps 17-20" and summary["rows"][-1]["weights"] == "steps 17-24"
    for decay, curve in zip((4, 8), summary["fork_curves"].values(), strict=True):
        assert curve[0] == [16, live] or curve[0] == (16, live)
        assert [s for s, _ in curve[1:-1]] == list(range(20, 16 + decay, 4))  # the run's eval_steps
        assert tuple(curve[-1]) == (16 + decay, losses[names[-2] if decay == 4 else names[-1]])

    report = Path(summary["report"]).read_text()
    assert "| live weights | step 16 |" in report and "share of decay gain" in report
    plot = Path(summary["plot"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    # The Trainer's evaluation (the curves) and the table's fp64 per-byte mean score the same bytes.
    assert summary["live_curve"][-1][1] == pytest.approx(live, abs=1e-4)
    assert summary["pma_curve"][-1][1] == pytest.approx(losses[names[1]], abs=1e-4)
    steps = [s for s, _ in summary["live_curve"]]
    assert steps == [4, 8, 12, 16] and [s for s, _ in summary["pma_curve"]] == steps


def test_pma_init_continues_from_both_folders(pretrain_run, tmp_path):
    from transformers import AutoModelForCausalLM

    run, _ = pretrain_run
    out = tmp_path / "sft"
    argv = [
        "--run_dir", str(run), "--output_dir", str(out), "--max_steps", "6", "--warmup_steps", "1",
        "--per_device_train_batch_size", "4", "--eval_steps", "3", "--logging_steps", "1",
        "--max_corpus_bytes", "16000", "--pretrain_max_corpus_bytes", "24000", "--train_stride", "32",
        "--use_cpu", "True",
    ]  # fmt: skip
    results = sft_from_pma.main(argv)
    live, pma = results["live-init"], results["pma-init"]
    assert Path(live["init"]).name == "checkpoint-16" and Path(pma["init"]).name == "pma"
    assert [s for s, _ in live["curve"]] == [s for s, _ in pma["curve"]] == [0, 3, 6]

    # Step 0 is the starting folder itself, scored on the new data's validation split.
    train, val = bytelm.split_corpus(bytelm.load_corpus("docstrings", 16_000), 0.1)
    val_ds = bytelm.ByteBlocks(val, 32).truncate(32)
    start = bytelm.validation_loss(AutoModelForCausalLM.from_pretrained(run / "pma"), val_ds)
    assert pma["curve"][0][1] == pytest.approx(start, abs=1e-9)
    assert live["curve"][0][1] != pytest.approx(start, abs=1e-6)

    # Each run saved its final model, and it is the one that was scored at the end.
    final = AutoModelForCausalLM.from_pretrained(out / "from_pma")
    assert bytelm.validation_loss(final, val_ds) == pytest.approx(pma["final_val_loss"], abs=1e-9)
    assert pma["grad_norm"]["max"] > 0
    report = (out / "results.md").read_text()
    assert "| 6 |" in report and "from PMA" in report
