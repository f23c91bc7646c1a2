"""`HfArgumentParser` reads every ``pma_*`` field of `PmaArguments` from the command line, JSON and YAML."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from transformers import HfArgumentParser

from pmakit import PmaArguments, PmaConfig
from pmakit.training.spike_config import SpikeConfig
from pmakit.training.wsa_config import WsaConfig


# field -> (a value other than its default, the other settings that value needs)
CASES = {
    "pma_fused_algo": ("wma", {}),
    "pma_fused_num": (3, {}),
    "pma_interleave_step": (7, {}),
    "pma_merge_steps": ([4, 8], {"pma_merge_window": 4, "pma_interleave_step": 2}),
    "pma_merge_window": (4, {"pma_merge_steps": [4, 8], "pma_interleave_step": 2}),
    "pma_merge_max_open": (3, {}),
    "pma_ema_alpha": (0.3, {"pma_fused_algo": "ema"}),
    "pma_fused_weights": ([1.0, 2.5], {"pma_fused_algo": "weights", "pma_fused_num": 2}),
    "pma_decay_shape": ("cosine", {"pma_fused_algo": "decay"}),
    "pma_start_step": (5, {}),
    "pma_write_back": (True, {}),
    "pma_eval": (True, {}),
    "pma_eval_lm_eval_tasks": (["arc_easy", "hellaswag"], {"pma_eval": True}),
    "pma_eval_lm_eval_include_path": ("tasks/local", {}),
    "pma_eval_lm_eval_num_fewshot": (3, {}),
    "pma_eval_lm_eval_limit": (0.5, {}),
    "pma_offload": ("cpu", {}),
    "pma_save": (False, {}),
    "pma_save_total_limit": (2, {}),
    "pma_export": ("async", {}),
    "pma_sample_store": (True, {}),
    "pma_sample_store_limit": (4, {}),
    "pma_hub_model_id": ("me/run-pma", {}),
    "pma_wsa_weight": (0.25, {}),
    "pma_wsa_target": ("reference", {"pma_wsa_reference": ["ref"]}),
    "pma_wsa_reference": (["a", "b"], {"pma_wsa_target": "fused"}),
    "pma_wsa_reference_weights": ([1.0, 3.0], {"pma_wsa_target": "fused", "pma_wsa_reference": ["a", "b"]}),
    "pma_wsa_layers": ("q_proj", {}),
    "pma_spike_recovery": (True, {}),
    "pma_spike_factor": (3.0, {}),
    "pma_spike_patience": (2, {}),
    "pma_spike_window": (20, {}),
    "pma_spike_min_history": (5, {}),
    "pma_spike_num_samples": (4, {}),
    "pma_spike_interval": (10, {}),
    "pma_spike_fused_algo": ("wma", {}),
    "pma_spike_ema_alpha": (0.4, {"pma_spike_fused_algo": "ema"}),
    "pma_spike_reset_optimizer": (False, {}),
    "pma_spike_rewarm_steps": (0, {}),
    "pma_spike_lr_scale": (0.5, {}),
    "pma_spike_max_recoveries": (1, {}),
    "pma_spike_offload": ("none", {}),
}
PMA_FIELDS = [f for f in dataclasses.fields(PmaArguments) if f.name.startswith("pma_")]


def _command_line(settings: dict) -> list[str]:
    words = []
    for key, value in settings.items():
        values = value if isinstance(value, list) else [value]
        words += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return words


def _parsed(source: str, settings: dict, tmp_path) -> PmaArguments:
    parser = HfArgumentParser(PmaArguments)
    common = {"output_dir": str(tmp_path), "report_to": "none"}
    if source == "cli":
        return parser.parse_args_into_dataclasses(_command_line({**common, **settings}))[0]
    path = tmp_path / f"args.{source}"
    path.write_text(json.dumps({**common, **settings}) if source == "json" else yaml.safe_dump({**common, **settings}))
    return (parser.parse_json_file if source == "json" else parser.parse_yaml_file)(str(path))[0]


def test_every_pma_field_has_a_case():
    assert sorted(CASES) == sorted(f.name for f in PMA_FIELDS)


@pytest.mark.parametrize("source", ["cli", "json", "yaml"])
@pytest.mark.parametrize("name", list(CASES))
def test_every_pma_field_is_read(name, source, tmp_path):
    value, needs = CASES[name]
    settings = {name: value, **needs}
    args = _parsed(source, settings, tmp_path)
    for f in PMA_FIELDS:
        got, expected = getattr(args, f.name), settings.get(f.name, f.default)
        assert got == expected and type(got) is type(expected), f"{f.name}: {got!r} != {expected!r}"
    assert args.pma_config == PmaConfig(**{k[4:]: v for k, v in settings.items() if k[4:] in vars(PmaConfig())})
    assert args.pma_spike_config == SpikeConfig(
        **{k[10:]: v for k, v in settings.items() if k.startswith("pma_spike_") and k != "pma_spike_recovery"}
    )
    if args.pma_wsa_weight:
        assert args.pma_wsa_config == WsaConfig(**{k[8:]: v for k, v in settings.items() if k.startswith("pma_wsa_")})
