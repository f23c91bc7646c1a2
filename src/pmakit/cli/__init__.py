"""The ``pmakit`` command: ``merge`` (YAML recipe), ``average`` (a run's checkpoints or models), ``inspect``,
``push`` (upload a finished folder), ``sweep`` (several merges, scored; the best kept).

Bad input (any `pmakit.errors.PmakitError`) exits with code 2 and a one-line ``pmakit: error: ...``
message; a failed Hub push exits with code 1 and says where the merged folder was kept; an unexpected
error exits with code 1 and one line (its traceback only with ``--debug``); SIGTERM (like Ctrl-C, 130) cleans
up and exits with 143. Heavy imports (torch, transformers, huggingface_hub) happen only on the
paths that need them: no module of this package imports them at module level.

One module a command (`merge` for merge and average, `inspect`, `push`, `sweep`); `flags` generates the merge flags
from `MergeOptions`, `exits` holds the exit codes and the error/signal handling. The parser and `main` live here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .exits import INTERRUPTED, TERMINATED, Terminated, report, sigterm_as_interrupt
from .flags import add_option_flags, cli_wording, inspect_fields, option_settings, options_from_args
from .inspect import cmd_inspect as _cmd_inspect
from .merge import cmd_average as _cmd_average
from .merge import cmd_merge as _cmd_merge
from .push import cmd_push as _cmd_push
from .sweep import add_sweep_parser
from .sweep import cmd_sweep as _cmd_sweep


__all__ = ["build_parser", "cli_wording", "main", "option_settings", "options_from_args"]


def _version() -> str:
    """The installed distribution's version (pyproject reads it from ``pmakit.__version__``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pmakit")
    except PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The ``pmakit`` parser; the ``average`` and ``merge`` flags are generated from `MergeOptions`."""
    parser = argparse.ArgumentParser(
        prog="pmakit", description="Merge checkpoints into one model and push it to the Hub."
    )
    parser.add_argument("--version", action="version", version=f"pmakit {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser(
        "merge",
        help="run a YAML recipe (pmakit's, or a mergekit linear recipe)",
        description="Run a YAML recipe: pmakit's (keys: models/run_dir/output and the merge options below) "
        "or a mergekit `merge_method: linear` recipe. Flags given here override the recipe's settings.",
    )
    m.add_argument("recipe", help="recipe file, e.g. recipe.yaml or a merged folder's pmakit_recipe.yaml")
    m.add_argument("-o", "--output", help="output folder (overrides the recipe's `output`)")
    add_option_flags(m)

    a = sub.add_parser("average", help="average a run's checkpoints, or model folders / Hub ids")
    a.add_argument(
        "inputs", nargs="+", help="a run folder, or model folders / owner/name[@revision] Hub ids (oldest first)"
    )
    a.add_argument("-o", "--output", help="output folder")
    add_option_flags(a)

    p = sub.add_parser(
        "push",
        help="upload a finished folder (with its model card) to the Hub, e.g. to retry a failed push",
        description="Upload FOLDER as it is (weights, config, tokenizer, model card, recipe) to the Hub repo "
        "REPO_ID. The token comes from HF_TOKEN or the saved login and is never printed.",
    )
    p.add_argument("folder", help="the folder to upload, e.g. a merged folder whose push failed")
    p.add_argument("repo_id", help="the Hub repo, owner/name")
    p.add_argument("--private", action="store_true", help="create the repo private (only when it does not exist)")
    p.add_argument("--revision", metavar="BRANCH", help="Hub branch to push to (created when missing)")
    p.add_argument("--commit-message", metavar="TEXT", help="commit message (default: names the folder)")

    i = sub.add_parser("inspect", help="list a run's checkpoints and what a merge would read")
    i.add_argument("inputs", nargs="+", help="a run folder, or model folders")
    add_option_flags(i, inspect_fields())
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
    add_sweep_parser(sub)
    parser.add_argument("--debug", action="store_true", help="print the traceback of an unexpected error")
    for command in sub.choices.values():  # `pmakit merge ... --debug` works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pmakit`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # looked up when called, so a test can replace one (monkeypatch.setattr(cli, "_cmd_inspect", ...))
    commands = {"merge": _cmd_merge, "average": _cmd_average, "inspect": _cmd_inspect, "push": _cmd_push}
    handler = {**commands, "sweep": _cmd_sweep}[args.command]
    try:
        with sigterm_as_interrupt():
            return handler(args)
    except Terminated:
        print("pmakit: terminated (SIGTERM); no output was left behind", file=sys.stderr)
        return TERMINATED
    except KeyboardInterrupt:
        print("pmakit: interrupted; no output was left behind", file=sys.stderr)
        return INTERRUPTED
    except Exception as e:  # noqa: BLE001 - mapped to exit codes below, one line each
        return report(e, debug=args.debug)
