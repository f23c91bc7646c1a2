"""`pmakit merge` (a YAML recipe) and `pmakit average` (a run's checkpoints or models): one merge each."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .exits import PUSH_FAILED
from .flags import options_from_args
from .inspect import input_scopes


def _run_merge(inputs: dict, options) -> int:
    from ..merging import merge

    if options.check_scopes:
        _warn_scopes(inputs, options)
        options = dataclasses.replace(options, check_scopes=False)
    try:
        result = merge(**inputs, options=options)
    except Exception as e:
        if type(e).__name__ != "HubPushError":
            raise
        message = " ".join(str(e).split())  # it names the folder that is kept
        print(f"pmakit: error: push failed: {message}", file=sys.stderr)
        return PUSH_FAILED
    if options.dry_run:
        print(result.plan.describe())
        return 0
    print(f"merged {len(result.plan.sources)} inputs into {result.output} in {result.seconds:.1f} s")
    if result.commit_url:
        print(f"pushed: {result.commit_url}")
    return 0


def _warn_scopes(inputs: dict, options) -> None:
    """Print (stderr) the layers whose weight scopes differ across the merge inputs, before any merge runs."""
    from ..merging import plan_merge
    from ..merging.scopes import compare_scopes

    plan = plan_merge(inputs.get("models"), run_dir=inputs.get("run_dir"), options=options)
    scopes, names = input_scopes(plan)
    flagged = compare_scopes(scopes, options.scope_threshold)
    if flagged:
        worst = ", ".join(
            f"{d.name} (std ratio {d.std_ratio:.3f}, mean shift {d.mean_shift:.3f})" for d in flagged[:5]
        )
        print(
            f"pmakit: warning: weight scopes of the {len(names)} inputs differ beyond {options.scope_threshold:g} "
            f"in {len(flagged)} layer(s): {worst}; see `pmakit inspect --scopes`",
            file=sys.stderr,
        )


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge what a recipe names, with the flags given on top of its settings."""
    from ..merging.recipe import INPUT_KEYS, load_recipe

    settings = load_recipe(args.recipe)
    inputs = {k: settings.pop(k) for k in INPUT_KEYS if k in settings}
    if args.output:
        inputs["output"] = args.output
    return _run_merge(inputs, options_from_args(args, settings))


def cmd_average(args: argparse.Namespace) -> int:
    """Average a run folder or model folders / Hub ids into ``-o OUT``."""
    from ..merging import MergeError

    options = options_from_args(args)
    if not options.dry_run and not args.output:
        raise MergeError("average needs an output folder: -o OUT (or --dry-run).")
    return _run_merge({"models": args.inputs, "output": args.output}, options)
