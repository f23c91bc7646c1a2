"""`pmakit inspect`: a run's checkpoints and what a merge would read, with ``--scopes`` each input's weight scopes."""

from __future__ import annotations

import argparse
from itertools import pairwise
from pathlib import Path

from .flags import option_settings


def input_scopes(plan) -> tuple[list, list[str]]:
    """Each input's per-layer weight scopes (reads every weight once), and the inputs' names."""
    from ..merging.scopes import folder_scopes

    return [folder_scopes(s.path) for s in plan.sources], [s.name for s in plan.sources]


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print a run's checkpoint folders and the merge plan (with ``--scopes``, the weight scopes)."""
    from ..io.dtype_names import format_size
    from ..merging import is_run_dir, list_checkpoints, plan_merge

    selection = option_settings(args)
    selected_kind = selection.pop("kind", "checkpoint")
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
                    print(f"    {c.path.name:<20} step {c.step:>8}  {format_size(c.size):>10}")
        if not any(list_checkpoints(run, k) for k in ("checkpoint", "pma")):
            print("  no checkpoint-N or pma-N folders")
            return 0
        if selected_kind == "checkpoint" and not list_checkpoints(run, "checkpoint"):
            selected_kind = "pma"
        plan = plan_merge(run_dir=run, kind=selected_kind, **selection)
    else:
        plan = plan_merge(args.inputs, kind=selected_kind, **selection)
    print("a merge would read:")
    print(plan.describe())
    if args.scopes:
        from ..merging.scopes import format_scope_report

        print(format_scope_report(*input_scopes(plan), threshold=args.scope_threshold))
    return 0
