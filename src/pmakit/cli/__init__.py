"""The ``pmakit`` command: ``merge`` (YAML recipe), ``average`` (a run's checkpoints or models), ``inspect``,
``push`` (upload a finished folder).

Bad input (any `pmakit.errors.PmakitError`) exits with code 2 and a one-line ``pmakit: error: ...``
message; a failed Hub push exits with code 1 and says where the merged folder was kept; an unexpected
error exits with code 1 and one line (its traceback only with ``--debug``); SIGTERM (like Ctrl-C, 130) cleans
up and exits with 143. Heavy imports (torch, transformers, huggingface_hub) happen only on the
paths that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import signal
import sys
import threading
import traceback
import typing
from collections.abc import Callable, Collection, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any


__all__ = ["build_parser", "cli_wording", "main", "option_settings", "options_from_args"]

BAD_INPUT = 2
PUSH_FAILED = 1
UNEXPECTED = 1  # an error pmakit did not expect (a bug, or one from a library below it)
TERMINATED = 128 + 15  # the shell's code for a process stopped by SIGTERM


def _spec_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    """An argparse type for a rule spec ``name[:params]`` whose name must be one of ``choices``."""

    def check(text: str) -> str:
        from .errors import brief

        if text.partition(":")[0] not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {brief(text)} (choose from {', '.join(choices)}, optionally with :PARAMS)"
            )
        return text

    return check


def _flag_kwargs(f: dataclasses.Field, flag: str, hint: Any) -> dict[str, Any]:
    """argparse keywords of one `MergeOptions` field: its type, action, choices and help, from the field."""
    meta = f.metadata
    kwargs: dict[str, Any] = {
        "dest": f.name,
        "default": argparse.SUPPRESS,
        "help": meta.get("flag_help", meta["help"]),
    }
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = args[0] if len(args) == 1 else str
    if base is bool:  # a --no-... flag turns the setting off (on the command line --no-progress: on by default)
        return {**kwargs, "action": "store_false" if flag.startswith("--no-") else "store_true"}
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        repeat = {"action": "append"} if item is str else {"nargs": "+"}
        return {**kwargs, "type": item, **repeat, "metavar": meta.get("metavar")}
    if f.default is not None:
        kwargs["help"] += f" (default: {f.default})"
    choices = meta.get("choices")
    if meta.get("spec"):  # a rule spec: argparse checks the rule's name, MergeOptions its parameters
        return {**kwargs, "type": _spec_of(choices), "metavar": "{" + ",".join(choices) + "}[:PARAMS]"}
    return {**kwargs, "type": base, **({"choices": choices} if choices else {}), "metavar": meta.get("metavar")}


def _add_option_flags(parser: argparse.ArgumentParser, names: Collection[str] | None = None) -> None:
    """Add the flags of every `MergeOptions` field that has one (only the fields in ``names`` when given)."""
    from .merging.options import MergeOptions, option_fields

    hints = typing.get_type_hints(MergeOptions)
    titles = {"selection": "run folder selection (checkpoint-N / pma-N subfolders)", None: "merge options"}
    groups = {key: parser.add_argument_group(title) for key, title in titles.items()}
    for f in option_fields():
        group = groups[f.metadata.get("group")]
        if names is not None and f.name not in names:
            continue
        for flag, value, help_text in f.metadata.get("const_flags", ()):
            group.add_argument(
                flag, dest=f.name, action="store_const", const=value, default=argparse.SUPPRESS, help=help_text
            )
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        if flag is not None and "const_flags" not in f.metadata:
            kwargs = {k: v for k, v in _flag_kwargs(f, flag, hints[f.name]).items() if v is not None}
            group.add_argument(flag, **kwargs)


def _inspect_fields() -> list[str]:
    """`pmakit inspect` takes the selection and whether pickled checkpoints may be read."""
    from .merging.options import option_fields

    return [f.name for f in option_fields() if f.metadata.get("group") == "selection"] + ["allow_pickle"]


def option_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The `MergeOptions` fields given on the command line (flags left out keep the recipe's or the default)."""
    from .merging.options import option_fields

    return {f.name: getattr(args, f.name) for f in option_fields() if hasattr(args, f.name)}


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
    _add_option_flags(m)

    a = sub.add_parser("average", help="average a run's checkpoints, or model folders / Hub ids")
    a.add_argument(
        "inputs", nargs="+", help="a run folder, or model folders / owner/name[@revision] Hub ids (oldest first)"
    )
    a.add_argument("-o", "--output", help="output folder")
    _add_option_flags(a)

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
    _add_option_flags(i, _inspect_fields())
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
    _add_sweep(sub)
    parser.add_argument("--debug", action="store_true", help="print the traceback of an unexpected error")
    for command in sub.choices.values():  # `pmakit merge ... --debug` works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _add_sweep(sub) -> None:
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
    from .errors import brief

    try:
        return [float(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {brief(text)}") from None


@contextlib.contextmanager
def _interrupt_once():
    """The first SIGINT raises KeyboardInterrupt; after it SIGINT stays ignored, since the command is ending.

    A second Ctrl-C must neither cut the clean-up (removing a scratch model) short nor land in the
    interpreter's shutdown (torch's exit hooks), where it made the process die by the signal (-2)
    instead of exiting with 130.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    interrupted = False

    def interrupt(signum, frame):
        nonlocal interrupted
        interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        if not interrupted:
            signal.signal(signal.SIGINT, previous)


def _cmd_sweep(args: argparse.Namespace) -> int:
    with _interrupt_once():
        return _run_sweep(args)


def _run_sweep(args: argparse.Namespace) -> int:
    from .io.hub_target import HubTarget
    from .tools.sweep import expand_alphas, parse_rule, sweep, text_loss_scorer

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
    from .errors import InputError
    from .tools.sweep.lm_eval import lm_eval_scorer

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


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return str(n)  # pragma: no cover


def _run_merge(inputs: dict, options) -> int:
    from .merging import merge

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


def _input_scopes(plan):
    from .merging.scopes import folder_scopes

    return [folder_scopes(s.path) for s in plan.sources], [s.name for s in plan.sources]


def _warn_scopes(inputs: dict, options) -> None:
    """Print (stderr) the layers whose weight scopes differ across the merge inputs, before any merge runs."""
    from .merging import plan_merge
    from .merging.scopes import compare_scopes

    plan = plan_merge(inputs.get("models"), run_dir=inputs.get("run_dir"), options=options)
    scopes, names = _input_scopes(plan)
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


def options_from_args(args: argparse.Namespace, base: dict | None = None):
    """`MergeOptions` from ``base`` settings (a recipe's) with the flags given on top; a progress bar by default."""
    from .merging import MergeOptions
    from .merging.recipe import with_hub_flags

    return MergeOptions(**with_hub_flags({"progress": True, **(base or {}), **option_settings(args)}))


def _cmd_merge(args: argparse.Namespace) -> int:
    from .merging.recipe import INPUT_KEYS, load_recipe

    settings = load_recipe(args.recipe)
    inputs = {k: settings.pop(k) for k in INPUT_KEYS if k in settings}
    if args.output:
        inputs["output"] = args.output
    return _run_merge(inputs, options_from_args(args, settings))


def _cmd_average(args: argparse.Namespace) -> int:
    from .merging import MergeError

    options = options_from_args(args)
    if not options.dry_run and not args.output:
        raise MergeError("average needs an output folder: -o OUT (or --dry-run).")
    return _run_merge({"models": args.inputs, "output": args.output}, options)


def _cmd_push(args: argparse.Namespace) -> int:
    """Push-only: the same upload `merge --push-to-hub` makes, for a folder that is already complete."""
    from .errors import InputError
    from .io.hub_target import HubTarget

    folder = Path(args.folder).expanduser()
    if not folder.is_dir():
        raise InputError(f"{args.folder} is not a folder; give the folder to upload.")
    try:
        target = HubTarget(
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message or f"Upload {folder.resolve().name} with pmakit",
        )
    except ValueError as e:
        raise InputError(str(e)) from None
    from .io.hub import HubPushError, push_folder_to_hub

    try:
        url = push_folder_to_hub(folder, target)
    except HubPushError as e:
        print(f"pmakit: error: push failed: {' '.join(str(e).split())}", file=sys.stderr)
        return PUSH_FAILED
    print(f"pushed: {url}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .merging import is_run_dir, list_checkpoints, plan_merge

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
                    print(f"    {c.path.name:<20} step {c.step:>8}  {_size(c.size):>10}")
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
        from .merging.scopes import format_scope_report

        print(format_scope_report(*_input_scopes(plan), threshold=args.scope_threshold))
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM (how schedulers stop jobs), raised like Ctrl-C so that the same clean-up runs."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While the command runs, SIGTERM raises `_Terminated` in the main thread (elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# `name=value` as Python errors write a setting: the value is True/False, quoted text, `...` or one word; not
# inside a rule spec (`ema_corrected:alpha=0.1`, `bema:lag=5,alpha=...`), which the command line takes as written.
_SETTING = r"(?<![:,])\b{name}=(True|False|'[^']*'|\"[^\"]*\"|\.\.\.|[\w.+-]+)"


def _flag_for(f, value: str) -> str | None:
    """The command-line spelling of setting ``f.name=value`` (None when the field has no flag for it)."""
    meta = f.metadata
    text = value.strip("'\"")
    for flag, const, _ in meta.get("const_flags", ()):
        if const == text:
            return flag
    flag = meta.get("flag", "--" + f.name.replace("_", "-"))
    if flag is None or "const_flags" in meta:
        return None
    if value in ("True", "False"):
        return flag if (value == "False") == flag.startswith("--no-") else None
    return f"{flag} {meta.get('metavar') or f.name.upper()}" if value == "..." else f"{flag} {text}"


def cli_wording(message: str) -> str:
    """A library error as the command line says it: settings named by their flags (``overwrite=True`` ->
    ``--overwrite``). Errors are written once, with Python names; this is the one translation."""
    from .merging.options import option_fields

    for f in option_fields():
        pattern = re.compile(_SETTING.format(name=re.escape(f.name)))
        message = pattern.sub(lambda m, f=f: _flag_for(f, m.group(1)) or m.group(0), message)
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pmakit`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"merge": _cmd_merge, "average": _cmd_average, "inspect": _cmd_inspect, "push": _cmd_push}
    handler = {**commands, "sweep": _cmd_sweep}[args.command]
    try:
        with _sigterm_as_interrupt():
            return handler(args)
    except _Terminated:
        print("pmakit: terminated (SIGTERM); no output was left behind", file=sys.stderr)
        return TERMINATED
    except KeyboardInterrupt:
        print("pmakit: interrupted; no output was left behind", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - mapped to exit codes below, one line each
        return _report(e, debug=args.debug)


def _report(e: Exception, debug: bool) -> int:
    """One line on stderr for an error that ended a command, and its exit code: 2 for a pmakit error
    (bad input, a failed Hub request) or a missing/unwritable file, 1 for anything else (a bug: its
    traceback only with ``--debug``, so a user's terminal is not flooded)."""
    from .errors import PmakitError

    message = cli_wording(" ".join(str(e).split()))
    if isinstance(e, (PmakitError, FileExistsError, FileNotFoundError, NotADirectoryError, PermissionError)):
        print(f"pmakit: error: {message or type(e).__name__}", file=sys.stderr)
        return BAD_INPUT
    if debug:
        traceback.print_exc()
    hint = "" if debug else " (run with --debug for the traceback)"
    message = message if len(message) <= 300 else f"{message[:297]}..."
    print(f"pmakit: internal error: {type(e).__name__}: {message}{hint}", file=sys.stderr)
    return UNEXPECTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
