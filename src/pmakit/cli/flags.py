"""The merge flags of `pmakit merge`/`average`/`inspect`, generated from the `MergeOptions` fields, and the way
back: a library error's ``name=value`` settings spelled as the flags a user types."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from collections.abc import Callable, Collection
from typing import Any


def _spec_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    """An argparse type for a rule spec ``name[:params]`` whose name must be one of ``choices``."""

    def check(text: str) -> str:
        from ..errors import brief

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


def add_option_flags(parser: argparse.ArgumentParser, names: Collection[str] | None = None) -> None:
    """Add the flags of every `MergeOptions` field that has one (only the fields in ``names`` when given)."""
    from ..merging.options import MergeOptions, option_fields

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


def inspect_fields() -> list[str]:
    """`pmakit inspect` takes the selection and whether pickled checkpoints may be read."""
    from ..merging.options import option_fields

    return [f.name for f in option_fields() if f.metadata.get("group") == "selection"] + ["allow_pickle"]


def option_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The `MergeOptions` fields given on the command line (flags left out keep the recipe's or the default)."""
    from ..merging.options import option_fields

    return {f.name: getattr(args, f.name) for f in option_fields() if hasattr(args, f.name)}


def options_from_args(args: argparse.Namespace, base: dict | None = None):
    """`MergeOptions` from ``base`` settings (a recipe's) with the flags given on top; a progress bar by default."""
    from ..merging import MergeOptions
    from ..merging.recipe import with_hub_flags

    return MergeOptions(**with_hub_flags({"progress": True, **(base or {}), **option_settings(args)}))


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
    from ..merging.options import option_fields

    for f in option_fields():
        pattern = re.compile(_SETTING.format(name=re.escape(f.name)))
        message = pattern.sub(lambda m, f=f: _flag_for(f, m.group(1)) or m.group(0), message)
    return message
