"""`pmakit.settings`: a setting is declared once (default, help, check) and copied under a prefix with all three."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import HfArgumentParser

from pmakit import PmaArguments, PmaConfig
from pmakit.settings import at_least, one_of, prefixed_settings, setting, settle, settle_in_place, with_settings
from pmakit.training.spike_config import SpikeConfig
from pmakit.training.wsa_config import WsaConfig


@dataclasses.dataclass(frozen=True)
class Shards:
    count: int = setting(2, "How many shards.", at_least(1))
    names: list[str] | None = setting(None, "Shard names.", convert=lambda names: [str(n) for n in names])


@dataclasses.dataclass
@with_settings(prefixed_settings(Shards, "shard_", help_prefix="Shards: ", defaults={"count": 3}))
class Job:
    mode: str = setting("fast", "How to run.", one_of(("fast", "slow")))

    def __post_init__(self) -> None:
        settle_in_place(self)


def test_copies_keep_default_help_check_and_conversion():
    fields = {f.name: f for f in dataclasses.fields(Job)}
    assert list(fields) == ["shard_count", "shard_names", "mode"]
    assert fields["shard_count"].default == 3 and Shards().count == 2
    assert dict(fields["shard_count"].metadata) == {"help": "Shards: How many shards."}  # what argparse is given
    assert Job(shard_names=(1, "b")).shard_names == ["1", "b"]
    with pytest.raises(ValueError, match=r"^`shard_count` must be a positive integer; got 0\.$"):
        Job(shard_count=0)
    with pytest.raises(ValueError, match=r"^`mode` must be one of fast, slow; got 'quick'\.$"):
        Job(mode="quick")
    with pytest.raises(ValueError, match=r"^`count` must be a positive integer; got True\.$"):
        settle(Shards, {"count": True, "names": None})


def test_argument_parser_reads_the_copies_and_runs_their_checks():
    parser = HfArgumentParser(Job)
    (job,) = parser.parse_args_into_dataclasses(["--shard_count", "4", "--shard_names", "a", "b", "--mode", "slow"])
    assert job == Job(shard_count=4, shard_names=["a", "b"], mode="slow")
    assert "Shards: How many shards." in parser.format_help()
    with pytest.raises(ValueError, match="`shard_count` must be a positive integer"):
        parser.parse_dict({"shard_count": -1})


def test_an_argument_of_its_own_is_one_declaration(tmp_path):
    """How `PmaArguments` gains a setting of its own: one `setting(...)` line, parsed and checked with the rest."""

    @dataclasses.dataclass
    class Extended(PmaArguments):
        pma_report_every: int | None = setting(None, "Report every this many steps.", at_least(1, optional=True))

    parser = HfArgumentParser(Extended)
    assert "Report every this many steps." in parser.format_help()
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--pma_report_every", "5"])
    assert args.pma_report_every == 5
    with pytest.raises(ValueError, match=r"`pma_report_every` must be a positive integer or None; got 0\."):
        Extended(output_dir=str(tmp_path), pma_report_every=0)


@pytest.mark.parametrize(
    ("config", "prefix"), [(PmaConfig, "pma_"), (WsaConfig, "pma_wsa_"), (SpikeConfig, "pma_spike_")]
)
def test_every_argument_field_is_its_settings_field(config, prefix):
    arguments = {f.name: f for f in dataclasses.fields(PmaArguments)}
    for f in dataclasses.fields(config):
        copy = arguments[prefix + f.name]
        assert (copy.check, copy.convert, copy.settings_of) == (f.check, f.convert, config)
        assert copy.metadata["help"].endswith(f.metadata["help"])
