"""Merge-schedule settings: parsing (Python, command line, JSON, YAML), and refusals that name fields and numbers."""

from __future__ import annotations

import json
import warnings

import pytest
import yaml
from transformers import HfArgumentParser

from pmakit import PmaArguments, PmaConfig, create_pma_optimizer
from pmakit.errors import InputError
from tests.helpers.models import tiny_llama


def test_settings_and_derived_cycle():
    config = PmaConfig(merge_steps=[400, 1000], merge_window=300, interleave_step=100, fused_num=10)
    assert config.merge_steps == [400, 1000] and config.merge_max_open == 2
    assert config.fused_num == 3  # the engine's cycle is one window: the rule is checked (and runs) on 3 samples
    assert PmaConfig(merge_steps="wsd", merge_window=200, interleave_step=100).fused_num == 2
    assert PmaConfig().merge_steps is None and PmaConfig().fused_num == 10


@pytest.mark.parametrize(
    "given, parsed",
    [("wsd", "wsd"), (["wsd"], "wsd"), (" WSD ", "wsd"), ("200,400", [200, 400]), (["200", "400"], [200, 400]),
     (400, [400]), ((200, 400), [200, 400])],
)  # fmt: skip
def test_merge_steps_forms(given, parsed):
    assert PmaConfig(merge_steps=given, merge_window=200, interleave_step=100).merge_steps == parsed


STEPS = dict(interleave_step=100, merge_window=200)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(merge_steps=[250], **STEPS), r"`merge_steps` must be multiples of `interleave_step`=100 .*got \[250\]"),
        (
            dict(merge_steps=[400, 200], **STEPS),
            "`merge_steps` must be sorted and unique; got step 200 after step 400",
        ),
        (dict(merge_steps=[400, 400], **STEPS), "sorted and unique; got step 400 after step 400"),
        (dict(merge_steps=[0], **STEPS), r"`merge_steps` must hold positive integers \(optimizer steps\); got 0"),
        (dict(merge_steps=["late"], **STEPS), "must hold positive integers .*got 'late'"),
        (dict(merge_steps=[], **STEPS), "`merge_steps` must be a list of optimizer steps or 'wsd'; got"),
        (dict(merge_steps=[400], interleave_step=100), "`merge_steps` needs `merge_window`: .* `interleave_step`=100"),
        (dict(merge_window=200), "`merge_window` is only used with `merge_steps`; got 200"),
        (dict(merge_steps=[400], merge_window=0, interleave_step=100), "`merge_window` must be a positive integer"),
        (
            dict(merge_steps=[400], merge_window=250, interleave_step=100),
            "`merge_window` must be a multiple of `interleave_step`=100, .*got 250",
        ),
        (
            dict(merge_steps=[300, 600], merge_window=400, interleave_step=100),
            r"merge at step 300 would start at step -100 \(`merge_window`=400\), before `start_step`=0",
        ),
        (
            dict(merge_steps=[600], start_step=500, **STEPS),
            r"merge at step 600 would start at step 400 \(`merge_window`=200\), before `start_step`=500",
        ),
        (
            dict(merge_steps=[400, 500, 600, 900], merge_window=300, interleave_step=100),
            r"keeps 3 windows open at once \(the merges at steps 400, 500, 600\), each an fp32 copy .*"
            r"`merge_max_open`=2 allows 2: space the merges 300 steps apart",
        ),
        (dict(merge_steps=[400], merge_max_open=0, **STEPS), "`merge_max_open` must be a positive integer; got 0"),
        (dict(merge_steps="wsd", write_back=True, **STEPS), "`write_back`=True continues training from each cycle's"),
        (dict(merge_steps=[400], offload="cpu", **STEPS), "`offload`='cpu' is not supported with a schedule"),
        (dict(merge_steps=[400], export="async", **STEPS), "`export`='async' is not supported with a schedule"),
        (
            dict(merge_steps=[400], eval=True, eval_lm_eval_tasks=["arc_easy"], **STEPS),
            "`eval_lm_eval_tasks`=.* is not supported with a schedule",
        ),
        (
            dict(merge_steps=[400], fused_algo="weights", fused_weights=[1.0, 2.0, 3.0], **STEPS),
            "`fused_weights`: Got 3 weights for 2 samples",  # the rule is checked on a window's 2 samples
        ),
    ],
)
def test_refusals_name_the_field_and_the_numbers(settings, message):
    with pytest.raises(InputError, match=message):
        PmaConfig(**settings)


def test_overlap_within_the_bound_is_allowed():
    config = PmaConfig(merge_steps=[400, 500, 600, 900], merge_window=300, interleave_step=100, merge_max_open=3)
    assert config.merge_max_open == 3
    # windows exactly `merge_window` apart never overlap: one open at a time
    PmaConfig(merge_steps=[300, 600, 900], merge_window=300, interleave_step=100, merge_max_open=1)
    # a rule with an anchor runs under a schedule; its window counts two fp32 copies (see test_schedule)
    PmaConfig(merge_steps=[300, 600], merge_window=300, interleave_step=100, fused_algo="bema:lag=5")


def test_arguments_use_prefixed_names(tmp_path):
    with pytest.raises(InputError, match=r"`pma_merge_steps` must be multiples of `pma_interleave_step`=2"):
        PmaArguments(output_dir=str(tmp_path), pma_interleave_step=2, pma_merge_steps=[5], pma_merge_window=2)
    with pytest.raises(InputError, match=r"`pma_merge_steps`='wsd' merges right before the decay .*'constant'"):
        PmaArguments(
            output_dir=str(tmp_path), lr_scheduler_type="constant", pma_merge_steps="wsd", pma_merge_window=2,
            pma_interleave_step=2,
        )  # fmt: skip


def test_late_merges_warn_and_wsd_does_not(tmp_path):
    with pytest.warns(UserWarning, match="the merges at steps 12, 16 come after max_steps=10"):
        PmaArguments(
            output_dir=str(tmp_path), max_steps=10, pma_interleave_step=2, pma_merge_steps=[8, 12, 16],
            pma_merge_window=4,
        )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor the "no cycle can complete" warning: there are no cycles
        PmaArguments(
            output_dir=str(tmp_path), max_steps=10, pma_interleave_step=4, pma_fused_num=10, pma_merge_steps=[8],
            pma_merge_window=4,
        )  # fmt: skip


WSD_ARGS = {"lr_scheduler_type": "warmup_stable_decay", "lr_scheduler_kwargs": {"num_decay_steps": 4}}


@pytest.mark.parametrize("source", ["cli", "json", "yaml"])
@pytest.mark.parametrize("steps, parsed", [(["4", "8"], [4, 8]), (["wsd"], "wsd")], ids=["list", "wsd"])
def test_parser_reads_a_list_or_wsd(source, steps, parsed, tmp_path):
    settings = {"output_dir": str(tmp_path), "report_to": "none", **WSD_ARGS, "pma_interleave_step": 2}
    settings.update(pma_merge_steps=steps, pma_merge_window=4, pma_merge_max_open=3)
    parser = HfArgumentParser(PmaArguments)
    if source == "cli":
        words = []
        for key, value in settings.items():
            value = json.dumps(value) if isinstance(value, dict) else value
            words += [f"--{key}", *(value if isinstance(value, list) else [str(value)])]
        args = parser.parse_args_into_dataclasses(words)[0]
    else:
        path = tmp_path / f"args.{source}"
        one = steps[0] if len(steps) == 1 else steps  # a file may give "wsd" as a plain string
        text = {**settings, "pma_merge_steps": one}
        path.write_text(json.dumps(text) if source == "json" else yaml.safe_dump(text))
        args = (parser.parse_json_file if source == "json" else parser.parse_yaml_file)(str(path))[0]
    assert args.pma_merge_steps == parsed and args.pma_merge_window == 4 and args.pma_merge_max_open == 3
    assert args.pma_config.merge_steps == parsed and args.pma_config.fused_num == 2


def test_optimizer_route_refuses_a_schedule(tmp_path):
    with pytest.raises(InputError, match="Merge schedules .* run through `PmaTrainer` or `PmaCallback`"):
        create_pma_optimizer(
            tiny_llama(), {"interleave_step": 2, "merge_steps": [4], "merge_window": 2}, output_dir=tmp_path
        )
