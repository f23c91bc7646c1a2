"""The docs site's own parts: the settings-table hook, the nav and the API reference."""

from __future__ import annotations

import dataclasses
import importlib.util
import re

import pytest
import yaml

from pmakit import PmaConfig
from tests.docs.snippets import ROOT


def _hook():
    spec = importlib.util.spec_from_file_location("settings_tables", ROOT / "docs" / "hooks" / "settings_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(table: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in table.splitlines()[2:]]


def test_settings_table_lists_every_field_with_its_default_and_help():
    rows = _rows(_hook().settings_table("pmakit.online.config.PmaConfig"))
    fields = dataclasses.fields(PmaConfig)
    assert [r[0] for r in rows] == [f"`{f.name}`" for f in fields]
    for row, field in zip(rows, fields, strict=True):
        assert row[1] == f"`{field.default!r}`"
        assert row[2] == " ".join(field.metadata["help"].split()).replace("|", "\\|")


ARGUMENTS = "pmakit.training.arguments.PmaArguments"
WSA_FIELDS = ["weight", "target", "reference", "reference_weights", "layers"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (f"{ARGUMENTS} pma_ -pma_spike_ -pma_wsa_", [f"pma_{f.name}" for f in dataclasses.fields(PmaConfig)]),
        (f"{ARGUMENTS} pma_wsa_", [f"pma_wsa_{name}" for name in WSA_FIELDS]),
        ("pmakit.training.spike_config.SpikeConfig interval num_samples", ["num_samples", "interval"]),
    ],
)
def test_prefixes_select_and_exclude_fields(spec, expected):
    assert [r[0].strip("`") for r in _rows(_hook().settings_table(spec))] == expected


def test_markers_are_replaced_and_bad_ones_fail_the_build():
    hook = _hook()
    page = "before\n<!-- settings: pmakit.training.wsa_config.WsaConfig -->\nafter"
    out = hook.expand_settings(page)
    assert out.startswith("before\n| name | default | meaning |") and "`weight`" in out and out.endswith("after")
    for spec, cause in [
        ("pmakit.online.config.NoSuchClass", "cannot import"),
        ("pmakit.online.config.RULE_FIELDS", "not a dataclass"),
        ("pmakit.online.config.PmaConfig zzz_", "selects no field"),
    ]:
        with pytest.raises(ValueError, match=cause):
            hook.settings_table(spec)


def test_a_field_without_help_fails_the_build(monkeypatch):
    @dataclasses.dataclass
    class Undocumented:
        size: int = 1

    import pmakit.online.config as config

    monkeypatch.setattr(config, "Undocumented", Undocumented, raising=False)
    with pytest.raises(ValueError, match="has no `help`"):
        _hook().settings_table("pmakit.online.config.Undocumented")


def test_the_settings_pages_use_every_configuration_dataclass():
    pages = "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    dataclasses_with_tables = (
        "online.config.PmaConfig",
        "training.arguments.PmaArguments",
        "training.spike_config.SpikeConfig",
        "merging.options.MergeOptions",
    )
    for dotted in dataclasses_with_tables:
        assert f"<!-- settings: pmakit.{dotted}" in pages, f"no settings table for {dotted}"
    assert "<!-- settings: pmakit.training.wsa_config.WsaConfig -->" in pages


def test_api_reference_documents_every_public_name():
    import pmakit

    pages = "".join(p.read_text() for p in sorted((ROOT / "docs" / "api").glob("*.md")))
    documented = set(re.findall(r"^::: pmakit\.[\w.]*\.(\w+)$", pages, re.M))
    missing = sorted(set(pmakit.__all__) - documented - {"__version__"})
    assert not missing, f"docs/api/*.md lack {missing}"


def test_api_reference_hides_engine_plumbing():
    """PmaEngine is shown with a `members:` list that leaves out the hooks the Trainer and custom loops call."""
    page = (ROOT / "docs" / "api" / "online.md").read_text()
    listed = page.split("::: pmakit.online.engine.PmaEngine", 1)[1].split(":::", 1)[0]
    assert "members:" in listed and "has_average" in listed
    for name in ("drive_externally", "on_step", "add_join_hook"):
        assert name not in listed


def test_nav_lists_every_page():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for value in node.values():
                yield from pages(value)
        elif isinstance(node, list):
            for item in node:
                yield from pages(item)

    listed = set(pages(config["nav"]))
    on_disk = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert listed == on_disk, f"nav and docs/ differ: {sorted(listed ^ on_disk)}"
