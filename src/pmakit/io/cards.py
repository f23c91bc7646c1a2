"""Model cards (``README.md``) for every folder pmakit writes, on `huggingface_hub`'s ``ModelCard``.

The metadata header is built by ``ModelCardData`` (so the Hub reads ``base_model``,
``library_name`` and ``tags`` as it expects); the body says what was averaged and carries the
exact recipe as YAML so the result can be reproduced.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import yaml


__all__ = ["build_model_card", "looks_like_hub_id"]

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
    from huggingface_hub import ModelCard, ModelCardData  # imported here: the merge path starts fast

    hub_ids = list(dict.fromkeys(m for m in base_models if looks_like_hub_id(m)))
    extra = {"base_model_relation": "merge"} if hub_ids else {}
    data = ModelCardData(
        base_model=hub_ids or None, library_name=library_name, tags=list(dict.fromkeys(tags)), **extra
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(title, summary, details, recipe)}")
    return str(card)
