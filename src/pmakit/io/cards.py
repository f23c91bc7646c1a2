"""Model cards (``README.md``) for every folder pmakit writes, in `huggingface_hub`'s ``ModelCard`` format.

The metadata header is the one ``ModelCardData`` writes (so the Hub reads ``base_model``,
``library_name`` and ``tags`` as it expects); the body says what was averaged and carries the
exact recipe as YAML so the result can be reproduced.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import yaml


__all__ = ["build_model_card", "card_metadata", "looks_like_hub_id"]

FOOTER = "Made with [pmakit](https://github.com/pmakit/pmakit)."


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` or ``name`` that is not a local path (cards name only Hub models as ``base_model``)."""
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")) or os.sep in name.replace("/", "", 1):
        return False
    return name.count("/") <= 1 and " " not in name


def _body(title: str, summary: str, details: Sequence[tuple[str, str]], recipe: dict | None) -> str:
    lines = [f"# {title}", "", summary.strip(), ""]
    for heading, text in details:
        lines += [f"## {heading}", "", text.strip(), ""]
    if recipe is not None:
        lines += ["## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", ""]
    lines += [FOOTER, ""]
    return "\n".join(lines)


def build_model_card(
    *,
    title: str,
    summary: str,
    base_models: Sequence[str] = (),
    library_name: str = "transformers",
    tags: Sequence[str] = ("merge", "pma"),
    recipe: dict | None = None,
    details: Sequence[tuple[str, str]] = (),
) -> str:
    """The text of a ``README.md`` with Hub metadata.

    Args:
        title: The card's heading.
        summary: One paragraph on what the model is and how it was made.
        base_models: The inputs; only Hub ids become ``base_model`` (with ``base_model_relation: merge``).
        library_name: ``transformers``, or ``peft`` for adapter folders.
        tags: Hub tags, duplicates dropped.
        recipe: Every setting that shaped the result, rendered as YAML.
        details: Extra ``(heading, markdown)`` sections.

    Returns:
        The card as text, metadata header first.
    """
    hub_ids = list(dict.fromkeys(m for m in base_models if looks_like_hub_id(m)))
    return f"---\n{card_metadata(hub_ids, library_name, tags)}\n---\n\n{_body(title, summary, details, recipe)}"


def card_metadata(hub_ids: Sequence[str], library_name: str, tags: Sequence[str]) -> str:
    """The YAML header, in the form and order `huggingface_hub`'s ``ModelCardData.to_yaml`` gives.

    Written with ``yaml`` directly: importing ``huggingface_hub``'s card classes costs about 0.4 s
    of CPU, more than the rest of the merge path's imports together (tests keep the two equal).
    """
    data = {"base_model": list(hub_ids) or None, "library_name": library_name, "tags": list(dict.fromkeys(tags))}
    if hub_ids:
        data["base_model_relation"] = "merge"
    data = {k: v for k, v in data.items() if v is not None}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).strip()
