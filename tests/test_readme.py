"""The README documents what the code does: every setting appears in its table with its default."""

import dataclasses
from pathlib import Path

from pmakit import PmaConfig


README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_settings_table_lists_every_field_with_its_default():
    for field in dataclasses.fields(PmaConfig):
        default = field.default if field.default is not dataclasses.MISSING else None
        shown = f'"{default}"' if isinstance(default, str) else str(default)
        row = f"| `{field.name}` | `pma_{field.name}` | `{shown}` |"
        assert row in README, f"README settings table lacks or misstates {field.name}: expected {row!r}"


def test_readme_shows_the_two_commands():
    assert "make demo" in README and "make test" in README
