"""mkdocs hook: settings tables generated from the dataclasses' `help` metadata.

A page writes a marker such as

    <!-- settings: pmakit.training.arguments.PmaArguments pma_ -pma_spike_ -pma_wsa_ -->

and the build replaces it with a Markdown table (name, default, help) of the dataclass's fields
whose names start with one of the given prefixes (all fields when none is given) and with none of
the `-`-prefixed ones. The tables therefore always match the code; a class that cannot be imported,
a field without `help`, or a marker that selects no field fails the build.
"""

from __future__ import annotations

import dataclasses
import importlib
import re


MARKER = re.compile(r"<!--\s*settings:\s*(?P<spec>[^>]*?)\s*-->")


def load_class(dotted: str) -> type:
    """Import ``package.module.Class`` and check that it is a dataclass."""
    module_name, _, class_name = dotted.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"settings marker: cannot import {dotted!r}: {err}") from err
    if not dataclasses.is_dataclass(cls):
        raise ValueError(f"settings marker: {dotted!r} is not a dataclass")
    return cls


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    return f"`{value!r}`".replace("|", "\\|")


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def settings_table(spec: str) -> str:
    """The Markdown table for a marker's spec: ``dotted.Class [prefix ...] [-excluded_prefix ...]``.

    Raises:
        ValueError: the class cannot be imported, is not a dataclass, a selected field has no
            `help` metadata, or no field is selected.
    """
    dotted, *words = spec.split()
    include = tuple(w for w in words if not w.startswith("-")) or ("",)
    exclude = tuple(w[1:] for w in words if w.startswith("-"))
    cls = load_class(dotted)
    rows = []
    for field in dataclasses.fields(cls):
        if not field.name.startswith(include) or (exclude and field.name.startswith(exclude)):
            continue
        if "help" not in field.metadata:
            raise ValueError(f"settings marker: {dotted}.{field.name} has no `help` metadata")
        rows.append(f"| `{field.name}` | {_default(field)} | {_cell(field.metadata['help'])} |")
    if not rows:
        raise ValueError(f"settings marker {spec!r} selects no field")
    return "\n".join(["| name | default | meaning |", "|---|---|---|", *rows])


def expand_settings(markdown: str) -> str:
    """Replace every settings marker in ``markdown`` by its table."""
    return MARKER.sub(lambda match: settings_table(match.group("spec")), markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (mkdocs hook signature)
    """mkdocs event: expand the markers of each page before it is rendered."""
    return expand_settings(markdown)
