"""Weight Scope Alignment in miniature: does WSA make two non-IID runs average better?

Two runs start from one initialisation of a small byte-level Llama (briefly pre-trained on the
whole training split, ``--shared_steps``; 0 forks from the random initialisation) and train on different halves
of a real corpus (the Python language reference that ships with CPython, ``pydoc_data.topics``,
split by topic: non-IID) with different learning rates. They are merged by plain averaging
(0.5 / 0.5), once for a pair trained without WSA and once for a pair trained with the WSA loss
(`pmakit.training.wsa.add_wsa` on a stock `transformers.Trainer`, target = the scopes at the fork).
For both pairs the script prints the validation loss of each run and of the average, the scope
spread between the two runs, and the loss along the line ``(1 - alpha) A + alpha B`` for alpha in
[0, 1], saved as a PNG. Every model is scored on the same held-out blocks (paired).

    python -m examples.wsa_merge                               # about 2 minutes on 2 CPU cores
    python -m examples.wsa_merge --plot docs/wsa_interpolation.png --json runs/wsa_merge.json

The outcome is reported as measured, whichever way it goes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

from examples.bytelm import ByteBlocks, llama_config, load_corpus, split_corpus, validation_loss
from examples.common import save_figure
from pmakit.soups.scopes import compare_scopes, compute_scopes
from pmakit.training.wsa import add_wsa
from pmakit.training.wsa_config import WsaConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default="topics", help="'topics', 'docstrings' or a text file/folder (see bytelm.py)")
    p.add_argument("--max_bytes", type=int, default=None, help="use at most this many bytes of the corpus")
    p.add_argument(
        "--shared_steps",
        type=int,
        default=200,
        help="steps of a shared warm-up on the whole train split "
        "before the fork (0: fork from the random initialisation)",
    )
    p.add_argument("--lr_shared", type=float, default=3e-3, help="learning rate of the shared warm-up")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run after the fork")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--hidden_size", type=int, default=64)
    p.add_argument("--num_layers", type=int, default=2)
    p.add_argument("--lr_a", type=float, default=2e-3, help="learning rate of run A (first half)")
    p.add_argument("--lr_b", type=float, default=1e-2, help="learning rate of run B (second half)")
    p.add_argument("--wsa_weight", type=float, default=1.0, help="weight of the WSA loss in the aligned pair")
    p.add_argument("--alphas", type=int, default=11, help="points on the interpolation line")
    p.add_argument("--val_blocks", type=int, default=256, help="held-out blocks every model is scored on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="write the interpolation curves to this PNG")
    p.add_argument("--json", default=None, help="write all numbers to this JSON file")
    return p.parse_args(argv)


def train(init_state, config, data, lr, steps, wsa_weight, args, out) -> dict:
    model = LlamaForCausalLM(config)
    model.load_state_dict(init_state)
    targs = TrainingArguments(
        output_dir=str(out),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=args.batch_size,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_steps=steps,
        save_strategy="no",
        logging_steps=max(1, steps // 5),
        disable_tqdm=True,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=data)
    if wsa_weight > 0:
        add_wsa(trainer, WsaConfig(weight=wsa_weight, target="init"))
    trainer.train()
    wsa = [h["wsa_loss"] for h in trainer.state.log_history if "wsa_loss" in h]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"state": state, "wsa_loss_last": wsa[-1] if wsa else None}


def interpolate(a: dict, b: dict, alpha: float) -> dict:
    return {k: torch.lerp(a[k].double(), b[k].double(), alpha).to(a[k].dtype) for k in a}


def line_losses(model, a, b, alphas, val) -> list[float]:
    out = []
    for alpha in alphas:
        model.load_state_dict(interpolate(a, b, alpha))
        out.append(validation_loss(model, val))
    return out


def scope_spread(a: dict, b: dict) -> dict:
    diffs = compare_scopes([compute_scopes(a), compute_scopes(b)], threshold=None)
    return {
        "max_std_ratio": max(d.std_ratio for d in diffs),
        "mean_std_ratio": sum(d.std_ratio for d in diffs) / len(diffs),
        "layers_over_0.1": sum(d.score > 0.1 for d in diffs),
        "layers": len(diffs),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast, and does not spin on a busy machine
    train_bytes, val_bytes = split_corpus(load_corpus(args.corpus, args.max_bytes), val_fraction=0.1)
    half = len(train_bytes) // 2  # the topics are in sorted order: each half covers different ones (non-IID)
    data_a = ByteBlocks(train_bytes[:half], args.block_size)
    data_b = ByteBlocks(train_bytes[half:], args.block_size)
    val_all = ByteBlocks(val_bytes, args.block_size)
    val = _Blocks(val_all, list(range(0, len(val_all), max(1, len(val_all) // args.val_blocks)))[: args.val_blocks])
    config = llama_config(
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=4,
        intermediate_size=2 * args.hidden_size,
        block_size=args.block_size,
    )
    torch.manual_seed(args.seed)
    init = LlamaForCausalLM(config)
    init_state = {k: v.detach().clone() for k, v in init.state_dict().items()}
    results = {"settings": vars(args).copy(), "pairs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.shared_steps > 0:  # one initialisation for both runs: a briefly pre-trained model
            shared = train(
                init_state,
                config,
                ByteBlocks(train_bytes, args.block_size),
                args.lr_shared,
                args.shared_steps,
                0.0,
                args,
                Path(tmp) / "shared",
            )
            init_state = shared["state"]
            init.load_state_dict(init_state)
            results["val_loss_fork_point"] = validation_loss(init, val)
        alphas = [i / (args.alphas - 1) for i in range(args.alphas)]
        for label, weight in (("plain", 0.0), ("wsa", args.wsa_weight)):
            run_a = train(init_state, config, data_a, args.lr_a, args.steps, weight, args, Path(tmp) / f"{label}_a")
            run_b = train(init_state, config, data_b, args.lr_b, args.steps, weight, args, Path(tmp) / f"{label}_b")
            curve = line_losses(init, run_a["state"], run_b["state"], alphas, val)
            merged = line_losses(init, run_a["state"], run_b["state"], [0.5], val)[0]
            results["pairs"][label] = {
                "wsa_weight": weight,
                "val_loss_a": curve[0],
                "val_loss_b": curve[-1],
                "val_loss_merged": merged,
                "merged_minus_best_end": merged - min(curve[0], curve[-1]),
                "barrier": max(curve) - ((curve[0] + curve[-1]) / 2),
                "curve": curve,
                "scope_spread": scope_spread(run_a["state"], run_b["state"]),
                "wsa_loss_last": [run_a["wsa_loss_last"], run_b["wsa_loss_last"]],
            }
    results["alphas"] = alphas
    results["seconds"] = round(time.time() - start, 1)
    report(results)
    if args.plot:
        plot(results, args.plot)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


class _Blocks:
    """A fixed subset of validation blocks with the indexing `validation_loss` expects."""

    def __init__(self, blocks, indices: list[int]) -> None:
        self.blocks, self.indices = blocks, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.blocks[self.indices[i]]


def report(results: dict) -> None:
    print(f"\nWSA merge experiment ({results['seconds']} s); validation loss in nats/byte, lower is better")
    if "val_loss_fork_point" in results:
        print(f"shared initialisation (after the warm-up): {results['val_loss_fork_point']:.4f}")
    columns = ("run A", "run B", "average", "avg-best", "barrier", "std ratio max/mean")
    print(f"{'pair':6} " + " ".join(f"{c:>{w}}" for c, w in zip(columns, (8, 8, 8, 9, 8, 19), strict=True)))
    for label, r in results["pairs"].items():
        s = r["scope_spread"]
        print(
            f"{label:6} {r['val_loss_a']:8.4f} {r['val_loss_b']:8.4f} {r['val_loss_merged']:8.4f} "
            f"{r['merged_minus_best_end']:+9.4f} {r['barrier']:8.4f} "
            f"{s['max_std_ratio']:9.3f}/{s['mean_std_ratio']:.3f}"
        )
    plain, wsa = results["pairs"]["plain"]["val_loss_merged"], results["pairs"]["wsa"]["val_loss_merged"]
    verdict = "lower" if wsa < plain else "higher"
    print(f"Averaged model: {wsa:.4f} with WSA vs {plain:.4f} without ({wsa - plain:+.4f}: WSA is {verdict}).")


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, r in results["pairs"].items():
        name = "without WSA" if label == "plain" else f"with WSA (weight {r['wsa_weight']:g})"
        ax.plot(results["alphas"], r["curve"], marker="o", label=name)
    if "val_loss_fork_point" in results:
        ax.axhline(results["val_loss_fork_point"], color="gray", linestyle="--", label="shared initialisation")
    s = results["settings"]
    ax.set_xlabel(f"alpha: (1 - alpha) run A (half 1, lr {s['lr_a']:g}) + alpha run B (half 2, lr {s['lr_b']:g})")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("Loss along the line between two non-IID runs")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
