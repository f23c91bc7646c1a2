"""Merging DeepSpeed ZeRO checkpoints (`checkpoint-N/global_stepN/`) directly, without torch or DeepSpeed.

The checkpoints are real: saved by DeepSpeed on 2 CPU processes (gloo) for ZeRO stages 1, 2 and 3
(`zero_checkpoint_worker.py`), beside the fp32 master weights DeepSpeed gathers itself and the fp64
closed form of the PMA average. Skipped where DeepSpeed is not installed.
"""

import importlib.util
import os

import numpy as np
import pytest
import torch

from pmakit.averaging import merge_weights
from pmakit.errors import MergeError
from pmakit.merging import merge
from tests.distributed.launch import torchrun
from tests.helpers.folders import read_folder


pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")

STAGES = (1, 2, 3)
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero_ckpt")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torchrun("zero_checkpoint_worker.py", str(out), ",".join(map(str, STAGES)), timeout=500)
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_zero_checkpoints_merge_to_the_fp64_closed_form_of_the_fp32_masters(zero_runs, stage, tmp_path):
    run = zero_runs / f"zero{stage}" / "run"
    assert (run / "checkpoint-4" / "global_step4").is_dir() and not list(run.glob("checkpoint-*/*.safetensors"))
    result = merge(run_dir=run, last=3, algo="wma", output=tmp_path / "out", allow_pickle=True)
    assert [s.step for s in result.plan.sources] == [2, 3, 4]
    if stage == 3:
        assert any(len(i.pieces) == 2 for t in result.plan.tensors for i in t.inputs), "both ranks' partitions"
    states = [torch.load(zero_runs / f"zero{stage}" / "ref" / f"weights-{s}.pt") for s in (2, 3, 4)]
    weights = merge_weights(3, "wma")
    merged = read_folder(tmp_path / "out")
    assert set(merged) == set(states[0]) - {"lm_head.weight"}  # tied to the embedding
    for name, value in merged.items():
        assert value.dtype == torch.float32, name
        expected = sum(w * s[name].double() for w, s in zip(weights, states, strict=True))
        scale = torch.stack([s[name].abs() for s in states]).amax(0).double()
        assert ((value.double() - expected).abs() <= 4 * EPS32 * scale + 1e-30).all(), name
    # One checkpoint alone is its fp32 master weights, bit for bit.
    merge([run / "checkpoint-4"], tmp_path / "one", allow_pickle=True)
    for name, value in read_folder(tmp_path / "one").items():
        assert torch.equal(value, states[-1][name]), name


@pytest.mark.parametrize("stage", STAGES)
def test_zero_pma_state_becomes_a_model_folder(zero_runs, stage, tmp_path):
    run = zero_runs / f"zero{stage}" / "run"
    merge(run_dir=run, kind="pma-state", last=1, output=tmp_path / "pma", allow_pickle=True)
    expected = torch.load(zero_runs / f"zero{stage}" / "ref" / "pma-4.pt")
    merged = read_folder(tmp_path / "pma")
    assert set(merged) == set(expected) - {"lm_head.weight"}
    for name, value in merged.items():
        torch.testing.assert_close(value.double(), expected[name], rtol=1e-6, atol=1e-7, msg=name)


def test_zero_checkpoints_need_allow_pickle(zero_runs, tmp_path):
    with pytest.raises(MergeError, match=r"DeepSpeed ZeRO checkpoint \(global_step4\).*allow_pickle"):
        merge([zero_runs / "zero1" / "run" / "checkpoint-4"], tmp_path / "x")
