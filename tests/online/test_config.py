"""Settings are validated when built, with messages naming the field and the allowed values."""

import dataclasses
import json
import warnings

import pytest
import yaml
from transformers import HfArgumentParser

from pmakit import PmaArguments, PmaConfig


def test_defaults():
    config = PmaConfig()
    assert (config.fused_algo, config.fused_num, config.interleave_step, config.ema_alpha) == ("sma", 10, 1000, 0.2)
    assert (config.start_step, config.write_back, config.eval, config.offload) == (0, False, False, "none")
    assert config.save is True and config.save_total_limit is None


def test_config_is_frozen():
    config = PmaConfig(fused_algo="weights", fused_num=2, fused_weights=[1, 3])
    assert config.fused_weights == [1.0, 3.0] and all(type(w) is float for w in config.fused_weights)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.fused_num = 3
    assert dataclasses.replace(config, interleave_step=7).interleave_step == 7


def test_sample_steps():
    config = PmaConfig(interleave_step=3, start_step=6)
    assert [t for t in range(1, 20) if config.is_sample_step(t)] == [9, 12, 15, 18]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"fused_algo": "median"},
            "`fused_algo` must be one of sma, ema, ema_corrected, wma, weights, decay, ema_halflife, bema; "
            "got 'median'",
        ),
        ({"fused_algo": "ema", "ema_alpha": 1.5}, r"`ema_alpha` must lie in the open interval \(0, 1\)"),
        ({"fused_algo": "ema", "ema_alpha": 0}, r"`ema_alpha` must lie in the open interval \(0, 1\)"),
        ({"fused_num": 0}, "`fused_num` must be a positive integer"),
        ({"interleave_step": -5}, "`interleave_step` must be a positive integer"),
        ({"start_step": -1}, "`start_step` must be a non-negative integer"),
        ({"offload": "nvme"}, "`offload` must be one of none, cpu"),
        ({"save_total_limit": 0}, "`save_total_limit` must be a positive integer or None"),
        ({"fused_algo": "weights", "fused_num": 3, "fused_weights": [1, 2]}, "one weight per sample"),
        ({"fused_weights": [1.0]}, "only used with `fused_algo`='weights'"),
        ({"fused_algo": "weights", "fused_num": 2, "fused_weights": [1, -1]}, "`fused_weights`: .*sum to zero"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PmaConfig(**kwargs)


def test_arguments_errors_use_prefixed_names(tmp_path):
    with pytest.raises(
        ValueError, match="`pma_fused_algo` must be one of sma, ema, ema_corrected, wma, weights, decay"
    ):
        PmaArguments(output_dir=str(tmp_path), pma_fused_algo="lawa")
    with pytest.raises(ValueError, match=r"`pma_ema_alpha` must lie in the open interval \(0, 1\)"):
        PmaArguments(output_dir=str(tmp_path), pma_fused_algo="ema", pma_ema_alpha=2.0)


def test_horizon_warning(tmp_path):
    with pytest.warns(UserWarning, match="only 4 sample"):
        PmaArguments(output_dir=str(tmp_path), max_steps=400, pma_interleave_step=100, pma_fused_num=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PmaArguments(output_dir=str(tmp_path), max_steps=1000, pma_interleave_step=100, pma_fused_num=10)


def test_deepspeed_optimizer_section_is_refused(tmp_path):
    ds = {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    for value in (ds, str(path), json.dumps(ds)):
        with pytest.raises(ValueError, match="`optimizer` section.*PMA.*silently lost.*Remove the `optimizer`"):
            PmaArguments(output_dir=str(tmp_path), deepspeed=value)


def test_pma_config_property_round_trip(tmp_path):
    args = PmaArguments(
        output_dir=str(tmp_path), pma_fused_algo="wma", pma_fused_num=4, pma_interleave_step=7, pma_write_back=True
    )
    assert args.pma_config == PmaConfig(fused_algo="wma", fused_num=4, interleave_step=7, write_back=True)


def test_hf_argument_parser_cli_json_yaml(tmp_path):
    parser = HfArgumentParser(PmaArguments)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir", str(tmp_path),
            "--pma_fused_algo", "ema",
            "--pma_ema_alpha", "0.1",
            "--pma_fused_num", "3",
            "--pma_interleave_step", "5",
            "--pma_write_back",
            "--pma_offload", "cpu",
            "--pma_save_total_limit", "2",
            "--report_to", "none",
        ]
    )  # fmt: skip
    assert args.pma_config == PmaConfig(
        fused_algo="ema", ema_alpha=0.1, fused_num=3, interleave_step=5, write_back=True, offload="cpu",
        save_total_limit=2,
    )  # fmt: skip
    settings = {"output_dir": str(tmp_path), "pma_fused_algo": "wma", "pma_fused_num": 4, "report_to": "none"}
    (tmp_path / "a.json").write_text(json.dumps(settings))
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(settings))
    for parsed in (parser.parse_json_file(str(tmp_path / "a.json")), parser.parse_yaml_file(str(tmp_path / "a.yaml"))):
        assert parsed[0].pma_config.fused_algo == "wma" and parsed[0].pma_config.fused_num == 4
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**settings, "pma_fused_algo": "nope"}))
    with pytest.raises(ValueError, match="`pma_fused_algo` must be one of"):
        parser.parse_yaml_file(str(tmp_path / "bad.yaml"))


def test_help_text_present():
    parser = HfArgumentParser(PmaArguments)
    text = parser.format_help()
    for name in ("--pma_fused_algo", "--pma_interleave_step", "--pma_write_back", "--pma_offload"):
        assert name in text


@pytest.mark.parametrize("algo", ["sma", "ema", "ema_corrected", "wma"])
def test_a_huge_cycle_is_checked_without_expanding_its_weights(algo, monkeypatch):
    """`fused_num=10**9` (an EMA that never ends a cycle, as in benchmarks/update.py) builds no 10**9 weights."""
    from pmakit.averaging import rule_class

    cls = rule_class(algo)
    weights_for, coefficient, seen = cls.weights_for, cls.coefficient, []

    def small_weights(self, n, *args, **kwargs):
        seen.append(n)
        assert n <= 2, f"{algo}: the check expanded {n} weights"
        return weights_for(self, n, *args, **kwargs)

    def small_coefficient(self, k, *args, **kwargs):
        assert k <= 2, f"{algo}: the check walked the running form to k={k}"
        return coefficient(self, k, *args, **kwargs)

    monkeypatch.setattr(cls, "weights_for", small_weights)
    monkeypatch.setattr(cls, "coefficient", small_coefficient)
    assert PmaConfig(fused_algo=algo, fused_num=10**12).fused_num == 10**12
    assert seen, "the rule's weights are still checked (over a short cycle)"
