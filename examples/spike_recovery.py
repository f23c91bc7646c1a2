"""Loss-spike recovery in miniature: the same run with and without `pma_spike_recovery`.

A small Llama-style byte-level language model is trained from scratch on the Python standard
library's own source files (on every machine with Python; nothing is downloaded) with AdamW at
a normal learning rate. The spike is *provoked*, and the same way in both runs: for a few steps
the learning rate is multiplied by 100 (what a mis-set scheduler or a bad restart does). A model
this small does not spike on its own on 2 CPU cores: at every peak learning rate we tried (up to
1.0, with and without clipping) AdamW stalls near the unigram loss instead of diverging.

After the burst the unguarded run's loss jumps from about 2 to about 10 and settles on the
unigram plateau (about 3 nats/byte), where it stays. The guarded run (``PmaArguments(
pma_spike_recovery=True)``) sees the spike, restores the SMA of the last weights sampled before
it, resets the Adam moments and re-warms the learning rate, and ends with a much lower loss.
Both runs see the same data in the same order and are identical until the burst.

    python -m examples.spike_recovery             # about 40 s on 2 CPU cores
    python -m examples.spike_recovery --plot docs/spike_recovery.png

It prints both final losses (mean training loss over the last steps, and held-out loss) and
can save a PNG of the two loss curves with the burst and the recoveries marked.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, TrainerCallback

from examples.common import save_figure
from examples.models import tiny_llama
from pmakit import PmaArguments, PmaTrainer


def corpus(max_bytes: int) -> bytes:
    """Bytes of the standard library's own sources, in a fixed order (deterministic everywhere)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    data = bytearray()
    for path in sorted(root.glob("*.py")):
        data += path.read_bytes()
        if len(data) >= max_bytes:
            break
    if len(data) < 4096:
        raise SystemExit(f"Found only {len(data)} bytes of Python sources under {root}.")
    return bytes(data[:max_bytes])


class ByteBlocks(torch.utils.data.Dataset):
    def __init__(self, data: bytes, seq: int) -> None:
        ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        n = (len(ids) - 1) // seq
        self.blocks = ids[: n * seq].view(n, seq)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class LossRecorder(TrainerCallback):
    """Reads every step's loss from the model outputs (the Trainer only logs every `logging_steps`)."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []
        self._step_losses: list[float] = []
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def hook(module, inputs, output):
            if module.training and torch.is_grad_enabled() and getattr(output, "loss", None) is not None:
                self._step_losses.append(float(output.loss.detach()))

        self._hook = model.register_forward_hook(hook)

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_losses:
            self.losses.append((state.global_step, sum(self._step_losses) / len(self._step_losses)))
        self._step_losses = []

    def on_train_end(self, args, state, control, **kwargs):
        self._hook.remove()


class LrBurst(TrainerCallback):
    """Multiplies the scheduled learning rate by ``factor`` for ``length`` steps from ``start`` (the provocation).

    Applied at the start of the step; the scheduler sets the normal rate again after the optimizer step.
    """

    def __init__(self, start: int, length: int, factor: float) -> None:
        self.steps = range(start, start + length)
        self.factor = factor

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step + 1 in self.steps:
            for group in optimizer.param_groups:
                group["lr"] *= self.factor


def build_model(seed: int, width: int, layers: int, seq: int) -> LlamaForCausalLM:
    return tiny_llama(
        seed=seed,
        vocab_size=256,
        hidden_size=width,
        intermediate_size=width * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=seq,
        bos_token_id=None,
        eos_token_id=None,
    )


@torch.no_grad()
def held_out_loss(model, dataset: ByteBlocks, batch: int = 64) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch):
        ids = dataset.blocks[start : start + batch]
        out = model(input_ids=ids, labels=ids)
        total += float(out.loss) * len(ids)
        count += len(ids)
    return total / count


def run(opts, guarded: bool, train: ByteBlocks, valid: ByteBlocks, workdir: str) -> dict:
    model = build_model(opts.seed, opts.width, opts.layers, opts.seq)
    args = PmaArguments(
        output_dir=os.path.join(workdir, "guarded" if guarded else "unguarded"),
        use_cpu=True,
        report_to="none",
        max_steps=opts.steps,
        per_device_train_batch_size=opts.batch,
        learning_rate=opts.lr,
        warmup_steps=opts.warmup,
        lr_scheduler_type="constant_with_warmup",
        adam_beta2=0.99,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=10**6,
        save_strategy="no",
        disable_tqdm=True,
        seed=opts.seed,
        data_seed=opts.seed,
        dataloader_num_workers=0,
        pma_save=False,
        pma_interleave_step=10**6,
        pma_spike_recovery=guarded,
        pma_spike_interval=opts.interval,
        pma_spike_num_samples=3,
        pma_spike_rewarm_steps=opts.rewarm,
        pma_spike_lr_scale=opts.lr_scale,
        pma_spike_window=20,
        pma_spike_min_history=10,
    )
    recorder = LossRecorder()
    burst = LrBurst(opts.burst_at, opts.burst_steps, opts.burst_factor)
    trainer = PmaTrainer(model=model, args=args, train_dataset=train, callbacks=[recorder, burst])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    events = list(trainer.spike_callback.events) if trainer.spike_callback is not None else []
    tail = [loss for _, loss in recorder.losses[-opts.tail :]]
    finite_tail = [x for x in tail if math.isfinite(x)]
    final = sum(finite_tail) / len(finite_tail) if len(finite_tail) == len(tail) else float("nan")
    return {
        "losses": recorder.losses,
        "events": events,
        "final_train_loss": final,
        "held_out_loss": held_out_loss(trainer.model, valid),
        "seconds": seconds,
    }


def plot(results: dict, path: str, opts) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    for name, color in (("unguarded", "tab:red"), ("guarded", "tab:blue")):
        steps, losses = zip(*results[name]["losses"], strict=True)
        shown = [min(x, 12.0) if math.isfinite(x) else 12.0 for x in losses]
        ax.plot(steps, shown, color=color, lw=1.0, label=f"{name} (final {results[name]['final_train_loss']:.3f})")
    ax.axvspan(
        opts.burst_at - 0.5,
        opts.burst_at + opts.burst_steps - 0.5,
        color="0.6",
        alpha=0.3,
        label=f"LR x{opts.burst_factor:g} burst (both runs)",
    )
    for i, event in enumerate(results["guarded"]["events"]):
        ax.axvline(event["step"], color="tab:green", ls="--", lw=1.0, label="recovery" if i == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/byte)")
    ax.set_title(f"Loss-spike recovery (AdamW LR {opts.lr:g}, byte-level Llama {opts.width}x{opts.layers})")
    ax.legend(loc="upper right")
    ax.set_ylim(bottom=0)
    save_figure(fig, path)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--burst_at", type=int, default=120, help="first step of the learning-rate burst")
    p.add_argument("--burst_steps", type=int, default=5)
    p.add_argument("--burst_factor", type=float, default=100.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--interval", type=int, default=10, help="steps between recovery samples")
    p.add_argument("--rewarm", type=int, default=50)
    p.add_argument("--lr_scale", type=float, default=1.0)
    p.add_argument("--tail", type=int, default=20, help="final loss = mean training loss of the last TAIL steps")
    p.add_argument("--bytes", type=int, default=400_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for a model this small)")
    p.add_argument("--plot", default=None, help="write the PNG here (e.g. docs/spike_recovery.png)")
    p.add_argument("--json", default=None, help="write the numbers here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    opts = parse(argv)
    warnings.filterwarnings("ignore", message="PMA")  # PMA itself is off here: only the spike guard runs
    torch.set_num_threads(opts.threads)
    data = corpus(opts.bytes)
    split = int(len(data) * 0.95)
    train, valid = ByteBlocks(data[:split], opts.seq), ByteBlocks(data[split:], opts.seq)
    with tempfile.TemporaryDirectory() as workdir:
        results = {name: run(opts, name == "guarded", train, valid, workdir) for name in ("unguarded", "guarded")}
    for name in ("unguarded", "guarded"):
        r = results[name]
        print(
            f"{name:>9}: final training loss {r['final_train_loss']:.4f} (mean of last {opts.tail} steps), "
            f"held-out loss {r['held_out_loss']:.4f}, {len(r['events'])} recoveries, {r['seconds']:.1f} s"
        )
    for event in results["guarded"]["events"]:
        print(
            f"  recovery at step {event['step']} (spike began at {event['spike_began']}: {event['reason']}); "
            f"merged steps {event['merged_steps']}"
        )
    if opts.plot:
        plot(results, opts.plot, opts)
        print(f"plot written to {opts.plot}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
