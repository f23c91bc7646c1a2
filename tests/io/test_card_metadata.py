"""Cards are written without importing huggingface_hub, in exactly the form its ModelCard writes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from huggingface_hub import ModelCard, ModelCardData

from pmakit.io.cards import build_model_card, card_metadata


@pytest.mark.parametrize(
    ("bases", "library", "tags"),
    [
        (["org/a", "org/b"], "transformers", ["merge", "pma"]),
        ([], "peft", ["merge", "pma", "merge"]),
        (["org/ünïcode"], "transformers", ["pma", "soup"]),
    ],
)
def test_metadata_equals_model_card_data(bases, library, tags):
    extra = {"base_model_relation": "merge"} if bases else {}
    data = ModelCardData(base_model=bases or None, library_name=library, tags=list(dict.fromkeys(tags)), **extra)
    assert card_metadata(bases, library, tags) == data.to_yaml()


def test_card_round_trips_through_model_card():
    text = build_model_card(
        title="Merged", summary="An average.", base_models=["org/a", "./local"], recipe={"weights": [0.5, 0.5]}
    )
    card = ModelCard(text)
    assert str(card) == text
    assert card.data.base_model == ["org/a"] and card.data.tags == ["merge", "pma"]


def test_writing_a_card_does_not_import_huggingface_hub():
    code = (
        "import sys; from pmakit.io.cards import build_model_card; "
        "build_model_card(title='t', summary='s', base_models=['org/a'], recipe={'a': 1}); "
        "print('huggingface_hub' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
