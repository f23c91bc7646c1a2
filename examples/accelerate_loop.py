#!/usr/bin/env python
"""PMA in a custom training loop with 🤗 Accelerate, after HF's ``run_clm_no_trainer.py``.

A tiny byte-level Llama (see `bytelm.py`: the corpus ships with Python, nothing is downloaded) is
trained with `PmaAdamW`: the optimizer carries the PMA engine, so the fp32 average lives in its
state, is sharded like it, and is saved and restored by ``accelerator.save_state`` /
``load_state`` with everything else. Every ``--pma_fused_num`` samples the merged model is written
to ``output_dir/pma-<step>`` (main process only; a sharded model is gathered one tensor at a
time). `finish_pma` ends the run: it writes a final partial cycle to ``output_dir/pma`` and pushes
it when asked.

    python -m examples.accelerate_loop --output_dir runs/acc
    accelerate launch --num_processes 2 -m examples.accelerate_loop --output_dir runs/acc_ddp      # 2 GPUs
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 \\
        examples/accelerate_loop.py --output_dir runs/acc --resume_from_checkpoint runs/acc/step_100  # 2 CPU processes
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from transformers import LlamaForCausalLM, get_scheduler

from examples.bytelm import ByteBlocks, byte_tokenizer, llama_config, load_corpus, split_corpus
from pmakit import PmaAdamW, finish_pma


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--output_dir", required=True, help="Where checkpoints (step_<n>/) and PMA folders (pma-<n>/, pma/) go.")
    add("--corpus", default="topics", help="'topics', 'docstrings', or a text file / folder (see bytelm.py).")
    add("--max_corpus_bytes", type=int, default=200_000)
    add("--block_size", type=int, default=64)
    add("--per_device_train_batch_size", type=int, default=8)
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--learning_rate", type=float, default=3e-3)
    add("--lr_scheduler_type", default="constant_with_warmup")
    add("--num_warmup_steps", type=int, default=10)
    add("--max_train_steps", type=int, default=200)
    add("--checkpointing_steps", type=int, default=0, help="Save the Accelerate state every n steps (0: never).")
    add("--resume_from_checkpoint", default=None, help="A step_<n> folder written by this script.")
    add("--seed", type=int, default=0)
    add("--hidden_size", type=int, default=64)
    add("--num_layers", type=int, default=2)
    add("--num_heads", type=int, default=2)
    add("--intermediate_size", type=int, default=128)
    add("--pma_fused_algo", default="sma")
    add("--pma_fused_num", type=int, default=5)
    add("--pma_interleave_step", type=int, default=10)
    add("--pma_export", default="sync", choices=["sync", "async"])
    add("--push_to_hub", action="store_true", help="Push the final `pma/` to --hub_model_id.")
    add("--hub_model_id", default=None)
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id (the repo the final `pma/` goes to)")
    return args


def build(args: argparse.Namespace, accelerator: Accelerator):
    """Model, PMA optimizer, scheduler and data loader, prepared by Accelerate."""
    train_bytes, _ = split_corpus(load_corpus(args.corpus, args.max_corpus_bytes))
    dataset = ByteBlocks(train_bytes, args.block_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.per_device_train_batch_size, shuffle=True)
    model = LlamaForCausalLM(
        llama_config(args.hidden_size, args.num_layers, args.num_heads, args.intermediate_size, args.block_size)
    )
    pma = {
        "fused_algo": args.pma_fused_algo,
        "fused_num": args.pma_fused_num,
        "interleave_step": args.pma_interleave_step,
        "export": args.pma_export,
    }
    optimizer = PmaAdamW(
        model.parameters(),
        lr=args.learning_rate,
        pma=pma,
        pma_model=model,
        output_dir=args.output_dir,
        processing_class=byte_tokenizer(),
    )
    # The prepared scheduler steps once per process per step, hence the scaling (as run_clm_no_trainer does).
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    return accelerator.prepare(model, optimizer, loader, scheduler)


def train(args: argparse.Namespace, accelerator: Accelerator, model, optimizer, loader, scheduler) -> list[float]:
    """The loop: resume, accumulate, step, checkpoint. Returns the losses of the main process."""
    step = 0
    if args.resume_from_checkpoint:
        accelerator.load_state(args.resume_from_checkpoint)  # the PMA average and counters come back with it
        step = int(Path(args.resume_from_checkpoint).name.split("_")[-1])
    per_epoch = len(loader) // args.gradient_accumulation_steps
    losses = []
    while step < args.max_train_steps:
        epoch, done_in_epoch = divmod(step, per_epoch)
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, done_in_epoch * args.gradient_accumulation_steps)
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            losses.append(loss.item())
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                accelerator.save_state(os.path.join(args.output_dir, f"step_{step}"))
            if step >= args.max_train_steps:
                break
    return losses


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    set_seed(args.seed)
    model, optimizer, loader, scheduler = build(args, accelerator)
    losses = train(args, accelerator, model, optimizer, loader, scheduler)
    # The end of training for the optimizer route: wait for a background export, write a partial last
    # cycle to `pma/`, push it when asked. Every process calls it (a sharded model is gathered).
    pma = finish_pma(optimizer, push_to_hub=args.hub_model_id if args.push_to_hub else None)
    accelerator.wait_for_everyone()
    engine = optimizer.optimizer._pma_engine
    summary = {
        "num_processes": accelerator.num_processes,
        "steps": engine.step,
        "cycles": engine.num_cycles,
        "pma": str(pma),
        "last_loss": losses[-1:],
    }
    if accelerator.is_main_process:
        Path(args.output_dir, "summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(json.dumps(summary))
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
