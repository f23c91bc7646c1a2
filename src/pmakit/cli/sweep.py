"""`pmakit sweep`: merge with several rules and windows, score each merge, keep the best (torch, and lm-eval
when asked, are imported only once the command runs)."""

from __future__ import annotations

import argparse
import sys

from .exits import PUSH_FAILED, interrupt_once


def add_sweep_parser(sub) -> None:
    """The ``sweep`` subcommand and its flags, on the subparsers ``sub`` of `pmakit.cli.build_parser`."""
    s = sub.add_parser("sweep", help="merge a run's samples/checkpoints with several rules and windows; keep the best")
    s.add_argument("inputs", nargs="+", help="a run folder (pma-samples/step-N or checkpoint-N), or model folders")
    s.add_argument("--rules", nargs="+", required=True, help="sma wma ema ema_corrected decay:cosine decay:1-sqrt ...")
    s.add_argument("--windows", nargs="+", type=int, required=True, help="numbers of newest inputs to merge")
    scoring = s.add_mutually_exclusive_group(required=True)
    scoring.add_argument("--text", help="held-out UTF-8 text file scored by causal-LM loss")
    scoring.add_argument("--lm-eval-tasks", nargs="+", help="score by lm-evaluation-harness on these tasks")
    s.add_argument("--lm-eval-include-path", help="folder of extra lm-eval task YAMLs (lm_eval --include_path)")
    s.add_argument("--lm-eval-metric", default="acc", help="lm-eval metric to score by (metric or metric,filter)")
    s.add_argument("--lm-eval-num-fewshot", type=int, help="lm-eval few-shot examples (default: each task's)")
    s.add_argument("--lm-eval-limit", type=float, help="lm-eval examples per task (a fraction below 1)")
    s.add_argument("--lm-eval-batch-size", type=int, default=1, help="lm-eval batch size (default 1, lm-eval's)")
    s.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the merged folder's, i.e. the run's)")
    s.add_argument("--per", choices=["token", "byte"], default="token", help="loss per token or per UTF-8 byte")
    s.add_argument("--batch-size", type=int, default=8, help="blocks per forward pass")
    s.add_argument("--max-length", type=int, default=512, help="tokens per block")
    s.add_argument("--device", help="torch device for scoring (default: cpu)")
    alphas = s.add_mutually_exclusive_group()
    alphas.add_argument(
        "--alpha", type=float, help="EMA weight of the newest sample (ema, ema_corrected; default 0.2)"
    )
    alphas.add_argument(
        "--alphas", type=_numbers, metavar="A,B,...", help="alpha grid: one candidate per alpha of ema, ema_corrected"
    )
    s.add_argument("--source", choices=["auto", "samples", "checkpoints"], default="auto", help="run folder inputs")
    s.add_argument("-o", "--output-dir", required=True, help="folder for sweep.md/.csv/.png and best/")
    s.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT/best")
    s.add_argument("--push-to-hub", metavar="REPO_ID", help="push the best merge to this Hub repo")
    s.add_argument("--private", action="store_true", help="create the Hub repo private")


def _numbers(text: str) -> list[float]:
    """``0.05,0.1,0.2`` as numbers (argparse reports a bad one with exit code 2)."""
    from ..errors import brief

    try:
        return [float(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {brief(text)}") from None


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run the sweep; a second Ctrl-C cannot cut its clean-up short."""
    with interrupt_once():
        return _run_sweep(args)


def _run_sweep(args: argparse.Namespace) -> int:
    from ..io.hub_target import HubTarget
    from ..tools.sweep import expand_alphas, parse_rule, sweep, text_loss_scorer

    for rule in expand_alphas(args.rules, args.alphas):
        parse_rule(rule)  # a bad rule or alpha exits 2 before torch is imported
    target = HubTarget(args.push_to_hub, private=args.private) if args.push_to_hub else None
    if args.lm_eval_tasks:
        scorer = _lm_eval_scorer(args)
    else:
        scorer = text_loss_scorer(
            args.text,
            args.tokenizer,
            batch_size=args.batch_size,
            max_length=args.max_length,
            per=args.per,
            device=args.device,
        )
    try:
        result = sweep(
            args.inputs if len(args.inputs) > 1 else args.inputs[0],
            args.rules,
            args.windows,
            score=scorer,
            output_dir=args.output_dir,
            metric=getattr(scorer, "metric_name", f"loss per {args.per} (nats)"),
            alpha=args.alpha,
            alphas=args.alphas,
            source=args.source,
            overwrite=args.overwrite,
            push_to_hub=target,
        )
    except Exception as e:
        if type(e).__name__ != "HubPushError":
            raise
        message = " ".join(str(e).split())
        print(f"pmakit: error: push failed: {message}; the best merge is kept in {args.output_dir}", file=sys.stderr)
        return PUSH_FAILED
    print(result.markdown)
    best = result.best
    params = f" ({best.params_text.replace(';', ', ')})" if best.params else ""
    print(f"best: {best.rule}{params} over {best.window} inputs, saved to {result.best_folder}")
    print(f"table: {result.table_md} and {result.table_csv}")
    print(f"plot: {result.plot}" if result.plot else f"plot: none ({result.plot_note})")
    if result.commit_url:
        print(f"pushed: {result.commit_url}")
    return 0


def _lm_eval_scorer(args: argparse.Namespace):
    """The sweep's lm-eval scorer (lm-eval is imported here, not when the command line is parsed)."""
    from ..errors import InputError
    from ..tools.sweep.lm_eval import lm_eval_scorer

    try:
        return lm_eval_scorer(
            args.lm_eval_tasks,
            num_fewshot=args.lm_eval_num_fewshot,
            limit=args.lm_eval_limit,
            metric=args.lm_eval_metric,
            include_path=args.lm_eval_include_path,
            batch_size=args.lm_eval_batch_size,
            device=args.device,
        )
    except ImportError as e:
        raise InputError(str(e)) from None
