"""The ``pmakit`` command: ``merge`` (YAML recipe), ``average`` (a run's checkpoints or models), ``inspect``.

Bad input exits with code 2 and a one-line ``pmakit: error: ...`` message; a failed Hub push
exits with code 1 and says where the merged folder was kept. Heavy imports (torch,
transformers, huggingface_hub) happen only on the paths that need them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path


__all__ = ["build_parser", "main"]

BAD_INPUT = 2
PUSH_FAILED = 1


def _add_selection(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run folder selection (checkpoint-N / pma-N subfolders)")
    g.add_argument("--last", type=int, help="keep the last N checkpoints")
    g.add_argument(
        "--every", type=int, metavar="V", help="keep checkpoints V steps apart, counted back from the newest"
    )
    g.add_argument("--start", type=int, help="first step to consider")
    g.add_argument("--end", type=int, help="last step to consider")
    g.add_argument(
        "--pma",
        dest="kind",
        action="store_const",
        const="pma",
        default="checkpoint",
        help="select pma-N folders instead of checkpoint-N",
    )
    g.add_argument(
        "--pma-state",
        dest="kind",
        action="store_const",
        const="pma-state",
        help="read checkpoint-N folders' PMA average from their optimizer state (FSDP DCP `optimizer_0/`) "
        "instead of their weights",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pmakit", description="Merge checkpoints into one model and push it to the Hub."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="run a YAML recipe (keys: the arguments of pmakit.merge)")
    m.add_argument("recipe", help="recipe file, e.g. recipe.yaml or a merged folder's pmakit_recipe.yaml")
    m.add_argument("-o", "--output", help="output folder (overrides the recipe's `output`)")
    m.add_argument(
        "--overwrite", action="store_true", default=None, help="replace an existing non-empty output folder"
    )
    m.add_argument("--push-to-hub", metavar="REPO_ID", help="push the result to this Hub repo")
    _add_common(m)

    a = sub.add_parser("average", help="average a run's checkpoints, or model folders / Hub ids")
    a.add_argument(
        "inputs", nargs="+", help="a run folder, or model folders / owner/name[@revision] Hub ids (oldest first)"
    )
    a.add_argument("-o", "--output", help="output folder")
    _add_selection(a)
    a.add_argument("--algo", default="sma", choices=["sma", "ema", "wma", "weights"], help="averaging rule")
    a.add_argument("--alpha", type=float, default=0.2, help="EMA weight of the newest sample")
    a.add_argument("--weights", type=float, nargs="+", help="explicit weights, one per input (oldest first)")
    a.add_argument(
        "--no-normalize", dest="normalize", action="store_false", help="use weights as given (may be negative)"
    )
    a.add_argument("--base-model", help="base model: config/tokenizer donor and source of backbone-only tensors")
    a.add_argument("--backbone-only", action="store_true", help="keep embeddings, LM head and final norm of the base")
    a.add_argument(
        "--backbone-pattern",
        dest="backbone_patterns",
        action="append",
        help="regex of tensors kept from the base (repeatable; replaces the defaults)",
    )
    a.add_argument("--accumulate-dtype", default="float32", choices=["float32", "float64"])
    a.add_argument("--out-dtype", help="output dtype (default: the inputs')")
    a.add_argument("--max-shard-size", default="5GB", help="shard size in bytes, HF notation (5GB, 500MB, 2GiB)")
    a.add_argument("--no-tokenizer", dest="save_tokenizer", action="store_false", help="do not copy tokenizer files")
    a.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    a.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/Inf in inputs")
    a.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickled checkpoints (.bin, FSDP DCP folders), read by an allow-list unpickler",
    )
    a.add_argument("--push-to-hub", metavar="REPO_ID", help="push the result to this Hub repo")
    a.add_argument("--private", action="store_true", help="create the Hub repo private")
    a.add_argument("--revision", help="Hub branch to push to")
    a.add_argument("--commit-message", help="Hub commit message")
    _add_common(a)

    i = sub.add_parser("inspect", help="list a run's checkpoints and what a merge would read")
    i.add_argument("inputs", nargs="+", help="a run folder, or model folders")
    i.add_argument("--allow-pickle", action="store_true", help="read pickled checkpoints (.bin, DCP, ZeRO)")
    _add_selection(i)
    i.add_argument(
        "--scopes",
        action="store_true",
        help="also report each input's per-layer weight mean/std and "
        "flag the layers whose scopes differ (reads every weight once)",
    )
    i.add_argument(
        "--scope-threshold",
        type=float,
        default=0.1,
        help="flag a layer when max(std ratio - 1, mean spread / std) exceeds this (default 0.1)",
    )
    return parser


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="check the inputs and print the plan; write nothing")
    p.add_argument("--threads", type=int, help="worker threads (default: up to 4)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument(
        "--check-scopes",
        action="store_true",
        help="before merging, warn about layers whose weight "
        "scopes (mean/std) differ across the inputs (reads every weight once more)",
    )
    p.add_argument("--scope-threshold", type=float, default=0.1, help="threshold of --check-scopes (default 0.1)")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return str(n)  # pragma: no cover


def _run_merge(kwargs: dict, dry_run: bool) -> int:
    from .merging import merge

    try:
        result = merge(**kwargs, dry_run=dry_run)
    except Exception as e:
        if type(e).__name__ != "HubPushError":
            raise
        message = " ".join(str(e).split())
        print(
            f"pmakit: error: push failed: {message}; the merged model is kept at {kwargs['output']}", file=sys.stderr
        )
        return PUSH_FAILED
    if dry_run:
        print(result.plan.describe())
        return 0
    print(f"merged {len(result.plan.sources)} inputs into {result.output} in {result.seconds:.1f} s")
    if result.commit_url:
        print(f"pushed: {result.commit_url}")
    return 0


def _input_scopes(plan):
    from .merging.scopes import folder_scopes

    return [folder_scopes(s.path) for s in plan.sources], [s.name for s in plan.sources]


def _warn_scopes(kwargs: dict, threshold: float) -> None:
    """Print (stderr) the layers whose weight scopes differ across the merge inputs, before any merge runs."""
    import inspect

    from .merging import plan_merge
    from .merging.scopes import compare_scopes

    accepted = inspect.signature(plan_merge).parameters
    scopes, names = _input_scopes(plan_merge(**{k: v for k, v in kwargs.items() if k in accepted}))
    flagged = compare_scopes(scopes, threshold)
    if flagged:
        worst = ", ".join(
            f"{d.name} (std ratio {d.std_ratio:.3f}, mean shift {d.mean_shift:.3f})" for d in flagged[:5]
        )
        print(
            f"pmakit: warning: weight scopes of the {len(names)} inputs differ beyond {threshold:g} in "
            f"{len(flagged)} layer(s): {worst}; see `pmakit inspect --scopes`",
            file=sys.stderr,
        )


def _cmd_merge(args: argparse.Namespace) -> int:
    from .merging import load_recipe

    kwargs = load_recipe(args.recipe)
    if args.output:
        kwargs["output"] = args.output
    if args.overwrite:
        kwargs["overwrite"] = True
    if args.push_to_hub:
        kwargs["push_to_hub"] = args.push_to_hub
    if args.threads:
        kwargs["threads"] = args.threads
    kwargs["progress"] = args.progress
    if args.check_scopes:
        _warn_scopes(kwargs, args.scope_threshold)
    return _run_merge(kwargs, args.dry_run)


def _cmd_average(args: argparse.Namespace) -> int:
    from .merging import MergeError

    if args.algo == "weights" and not args.weights:
        raise MergeError("--algo weights needs --weights, one per input.")
    if args.weights and args.algo not in ("sma", "weights"):
        raise MergeError(f"--weights cannot be combined with --algo {args.algo}.")
    kwargs = dict(
        models=args.inputs,
        output=args.output,
        last=args.last,
        every=args.every,
        start=args.start,
        end=args.end,
        kind=args.kind,
        algo=args.algo,
        alpha=args.alpha,
        weights=args.weights,
        normalize=args.normalize,
        base_model=args.base_model,
        backbone_only=args.backbone_only,
        backbone_patterns=args.backbone_patterns,
        accumulate_dtype=args.accumulate_dtype,
        out_dtype=args.out_dtype,
        max_shard_size=args.max_shard_size,
        save_tokenizer=args.save_tokenizer,
        overwrite=args.overwrite,
        allow_nonfinite=args.allow_nonfinite,
        allow_pickle=args.allow_pickle,
        push_to_hub=args.push_to_hub,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        threads=args.threads,
        progress=args.progress,
    )
    if not args.dry_run and not args.output:
        raise MergeError("average needs an output folder: -o OUT (or --dry-run).")
    if args.check_scopes:
        _warn_scopes(kwargs, args.scope_threshold)
    return _run_merge(kwargs, args.dry_run)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .merging import is_run_dir, list_checkpoints, plan_merge

    selection = dict(last=args.last, every=args.every, start=args.start, end=args.end)
    if len(args.inputs) == 1 and is_run_dir(args.inputs[0]):
        run = Path(args.inputs[0])
        print(f"run folder {run}")
        for kind in ("checkpoint", "pma"):
            found = list_checkpoints(run, kind)
            if found:
                steps = [c.step for c in found]
                gaps = sorted({b - a for a, b in pairwise(steps)})
                print(
                    f"  {len(found)} {kind}-N folders, steps {steps[0]}..{steps[-1]}"
                    + (f", spacing {gaps}" if gaps else "")
                )
                for c in found:
                    print(f"    {c.path.name:<20} step {c.step:>8}  {_size(c.size):>10}")
        if not any(list_checkpoints(run, k) for k in ("checkpoint", "pma")):
            print("  no checkpoint-N or pma-N folders")
            return 0
        if args.kind == "checkpoint" and not list_checkpoints(run, "checkpoint"):
            args.kind = "pma"
        plan = plan_merge(run_dir=run, kind=args.kind, allow_pickle=args.allow_pickle, **selection)
    else:
        plan = plan_merge(args.inputs, kind=args.kind, allow_pickle=args.allow_pickle, **selection)
    print("a merge would read:")
    print(plan.describe())
    if args.scopes:
        from .merging.scopes import format_scope_report

        print(format_scope_report(*_input_scopes(plan), threshold=args.scope_threshold))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pmakit`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = {"merge": _cmd_merge, "average": _cmd_average, "inspect": _cmd_inspect}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("pmakit: interrupted; no output was left behind", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - mapped to exit codes below, one line each
        from .errors import InputError

        message = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, (InputError, FileExistsError, FileNotFoundError, NotADirectoryError, PermissionError)):
            print(f"pmakit: error: {message}", file=sys.stderr)
            return BAD_INPUT
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
