"""Settings declared once: a dataclass field with its default, help and check, and one validator for all.

A settings dataclass (`PmaConfig`, `SpikeConfig`, `WsaConfig`) declares each setting with `setting`;
`settle` converts and checks a set of values against those declarations, naming each field the way
the user wrote it (``prefix``: ``pma_`` in `PmaArguments`). `prefixed_settings` copies a settings
dataclass's fields into another dataclass under a prefix (how `PmaArguments` gets its ``pma_*``
fields), defaults, help and checks included, so nothing is written twice.

A check is called as ``check(key, values, name)``: ``values`` holds every setting of the dataclass
(already converted), ``key`` is the field checked and ``name(key)`` how to call a field in a message.
It raises ValueError. Checks run in field order, so a check may rely on the fields before it.

Pure Python: used by the torch-free layers and by the transformers glue alike.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import InputError, brief


__all__ = [
    "at_least",
    "finite_number",
    "one_of",
    "prefixed_settings",
    "setting",
    "setting_names",
    "Setting",
    "settle",
    "settle_in_place",
    "unprefixed",
    "with_settings",
]

Check = Callable[[str, Mapping[str, Any], Callable[[str], str]], None]


def setting(
    default: Any,
    help: str,  # noqa: A002 (the metadata key HfArgumentParser and the docs hook read)
    check: Check | None = None,
    *,
    convert: Callable[[Any], Any] | None = None,
    arg_type: Any = None,
) -> Any:
    """A dataclass field for one setting: its default, its help, how to check and normalise a value.

    Args:
        default: The default value (immutable: lists default to None).
        help: One or two sentences for ``--help`` and the docs' settings tables.
        check: ``check(key, values, name)``, raising ValueError that names the field by ``name(key)``.
        convert: Applied to a value that is not None before the checks (e.g. ``float`` over a list).
        arg_type: The type argument parsers see when it differs from the annotation (a field that
            also takes a callable from Python is a plain string on the command line).
    """
    return Setting.of(dataclasses.field(default=default, metadata={"help": help}), check, convert, arg_type)


class Setting(dataclasses.Field):
    """A dataclass field that also carries its check, conversion and parser type.

    They live on the field, not in ``metadata``: `HfArgumentParser` hands the metadata to
    ``argparse.add_argument``, so the metadata holds ``help`` only.
    """

    __slots__ = ("check", "convert", "arg_type", "settings_of", "prefix")

    @classmethod
    def of(cls, base: dataclasses.Field, check, convert, arg_type, settings_of=None, prefix="") -> Setting:
        """``base`` (from `dataclasses.field`) with the setting's extras."""
        made = object.__new__(cls)
        for slot in dataclasses.Field.__slots__:
            setattr(made, slot, getattr(base, slot))
        made.check, made.convert, made.arg_type = check, convert, arg_type
        made.settings_of, made.prefix = settings_of, prefix
        return made


def _extra(f: dataclasses.Field, name: str) -> Any:
    return getattr(f, name, None) if isinstance(f, Setting) else None


def setting_names(cls: type) -> tuple[str, ...]:
    """The settings a dataclass declares, in order."""
    return tuple(f.name for f in dataclasses.fields(cls))


def settle(cls: type, values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``values`` converted and checked against ``cls``'s settings; messages call field ``x`` ``prefix + x``.

    Raises:
        ValueError: a value fails its setting's check.
    """
    return _settle(dataclasses.fields(cls), values, prefix)


def _settle(declared: Sequence[dataclasses.Field], values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    def name(key: str) -> str:
        return f"`{prefix}{key}`"

    settled = dict(values)
    for f in declared:
        if _extra(f, "convert") is not None and settled.get(f.name) is not None:
            settled[f.name] = f.convert(settled[f.name])
    for f in declared:
        if _extra(f, "check") is not None:
            f.check(f.name, settled, name)
    return settled


def unprefixed(obj: object, cls: type, prefix: str) -> dict[str, Any]:
    """The values of ``obj``'s ``prefix``-ed copies of ``cls``'s settings, under ``cls``'s names."""
    return {name: getattr(obj, prefix + name) for name in setting_names(cls)}


def settle_in_place(obj: object) -> None:
    """Convert and check, in place, the settings of a dataclass built with `with_settings`.

    Each copied group is checked as its own dataclass would check it (names prefixed); then the
    class's own `setting` fields, together.

    Raises:
        ValueError: a value fails its setting's check.
    """
    groups = {f.prefix: f.settings_of for f in dataclasses.fields(obj) if _extra(f, "settings_of") is not None}
    for prefix, cls in groups.items():
        for name, value in settle(cls, unprefixed(obj, cls, prefix), prefix).items():
            setattr(obj, prefix + name, value)
    own = [f for f in dataclasses.fields(obj) if isinstance(f, Setting) and f.settings_of is None]
    for name, value in _settle(own, {f.name: getattr(obj, f.name) for f in own}, "").items():
        setattr(obj, name, value)


def prefixed_settings(
    cls: type, prefix: str, *, help_prefix: str = "", defaults: Mapping[str, Any] | None = None
) -> list[tuple[str, Any, dataclasses.Field]]:
    """``cls``'s settings as ``(prefix + name, type, field)`` for `dataclasses.make_dataclass` or `with_settings`.

    Each copy keeps the default (unless ``defaults`` overrides it), the help (after ``help_prefix``),
    the check and the conversion; its type is the setting's ``arg_type`` when it has one.
    """
    defaults = dict(defaults or {})
    hints = typing.get_type_hints(cls)
    copies = []
    for f in dataclasses.fields(cls):
        base = dataclasses.field(
            default=defaults.pop(f.name, f.default), metadata={**f.metadata, "help": help_prefix + f.metadata["help"]}
        )
        check, convert, arg_type = (_extra(f, key) for key in ("check", "convert", "arg_type"))
        copy = Setting.of(base, check, convert, None, cls, prefix)
        copies.append((prefix + f.name, arg_type or hints[f.name], copy))
    if defaults:
        raise TypeError(f"{cls.__name__} has no setting {sorted(defaults)}")
    return copies


def with_settings(*parts: list[tuple[str, Any, dataclasses.Field]] | str) -> Callable[[type], type]:
    """Class decorator, under ``@dataclass``: add generated settings to the class's own fields.

    ``parts`` are lists from `prefixed_settings` and names of fields the class body declares, in the
    order the fields should take; body fields not named follow at the end, in their own order.
    """

    def decorate(cls: type) -> type:
        own = dict(cls.__dict__.get("__annotations__", {}))
        annotations = {}
        for part in parts:
            for name, kind, f in [(part, own.pop(part), None)] if isinstance(part, str) else part:
                annotations[name] = kind
                if f is not None:
                    setattr(cls, name, f)
        cls.__annotations__ = {**annotations, **own}
        return cls

    return decorate


# Checks shared by several settings.


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def one_of(choices: Sequence[str]) -> Check:
    """The value must be one of ``choices``."""

    def check(key: str, values: Mapping[str, Any], name: Callable[[str], str]) -> None:
        if values[key] not in choices:
            raise InputError(f"{name(key)} must be one of {', '.join(choices)}; got {brief(values[key])}.")

    return check


def at_least(minimum: int, *, optional: bool = False, kind: str | None = None) -> Check:
    """The value must be an integer >= ``minimum`` (or None when ``optional``); ``kind`` words it."""
    kind = kind or ("a positive integer" if minimum == 1 else f"an integer >= {minimum}")

    def check(key: str, values: Mapping[str, Any], name: Callable[[str], str]) -> None:
        value = values[key]
        if optional and value is None:
            return
        if not _is_int(value) or value < minimum:
            raise InputError(f"{name(key)} must be {kind}{' or None' if optional else ''}; got {brief(value)}.")

    return check


def finite_number(value: Any) -> bool:
    """Whether ``value`` is a real, finite number (not a bool)."""
    return _is_number(value) and math.isfinite(value)
