"""ZeRO-2 checkpoint folders written with `torch.save` in DeepSpeed's layout (DeepSpeed is not needed):
the honest one reads back bit for bit; a rank whose partition is not fp32, or a field of the wrong
type on any rank, is an InputError naming the file and the field, never silently wrong weights.

Layout (as DeepSpeed's ZeRO-1/2 saves it): per parameter group, the parameters flattened back to back
and zero-padded to a multiple of the rank count; rank r's `single_partition_of_fp32_groups[g]` is its
equal share of that vector. `param_shapes` in the model-states file gives each group's names and shapes.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from pmakit.errors import InputError
from pmakit.io.deepspeed_zero import ZeroCheckpoint


WORLD = 2


@pytest.fixture
def params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 5, generator=g), "a.bias": torch.randn(3, generator=g)}


def save_zero2(folder: Path, params, *, partition_dtypes=None, optim=None, model=None) -> Path:
    """A ZeRO-2 folder of one group over ``WORLD`` ranks; ``partition_dtypes[r]`` stores rank r's partition
    in another dtype; ``optim`` / ``model`` override fields of every rank's optimizer state / the model file."""
    folder.mkdir(parents=True, exist_ok=True)
    flat = torch.cat([p.reshape(-1) for p in params.values()])
    flat = torch.cat([flat, torch.zeros(-len(flat) % WORLD)])
    share = len(flat) // WORLD
    for r in range(WORLD):
        part = flat[r * share : (r + 1) * share].clone().to((partition_dtypes or {}).get(r, torch.float32))
        state = {"zero_stage": 2, "partition_count": [WORLD], "single_partition_of_fp32_groups": [part]}
        state.update(optim(r) if optim else {})
        torch.save({"optimizer_state_dict": state}, folder / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    states = {
        "param_shapes": [OrderedDict((name, p.shape) for name, p in params.items())],
        "module": {},
        "buffer_names": [],
        "shared_params": {},
    }
    states.update(model or {})
    torch.save(states, folder / "mp_rank_00_model_states.pt")
    return folder


def _values(info) -> np.ndarray:
    parts = [np.fromfile(f, np.float32, hi - lo, offset=s) for f, s, lo, hi in info.spans(0, info.numel)]
    return np.concatenate(parts).reshape(info.shape)


def test_an_honest_folder_reads_back_bit_for_bit(tmp_path, params):
    tensors = ZeroCheckpoint(save_zero2(tmp_path, params)).tensors()
    assert set(tensors) == set(params)
    assert len(tensors["a.weight"].pieces) == 2  # split across the two ranks
    for name, value in params.items():
        assert np.array_equal(_values(tensors[name]), value.numpy()), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_rank_whose_partition_is_not_fp32_is_refused(tmp_path, params, dtype):
    """Rank 0 is fp32 and rank 1 is not: read as 4-byte floats, rank 1's bytes would give wrong weights."""
    folder = save_zero2(tmp_path, params, partition_dtypes={1: dtype})
    rank1 = folder / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    code = {torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
    with pytest.raises(InputError, match=rf"partition 0 of `single_partition_of_fp32_groups` is {code}") as info:
        ZeroCheckpoint(folder).tensors()
    assert str(rank1) in str(info.value)


OPTIM = "optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"


@pytest.mark.parametrize(
    ("optim", "model", "file", "message"),
    [
        (lambda r: {"partition_count": {"ranks": 2}}, None, OPTIM, r"`partition_count` must be a non-negative"),
        (lambda r: {"partition_count": [0]}, None, OPTIM, r"`partition_count` must be a positive rank count"),
        (lambda r: {"zero_stage": [2]}, None, OPTIM, r"`zero_stage` must be a non-negative integer, got \[2\]"),
        (
            lambda r: {"zero_stage": 3 if r else 2},
            None,
            OPTIM,
            r"the ranks disagree on `zero_stage` \(2 in \S+rank_0\S+, 3 in \S+rank_1\S+\)",
        ),
        (None, {"param_shapes": [{"a.weight": 15}]}, MODEL, r"`param_shapes`\[0\]\['a.weight'\] must be a list"),
        (None, {"param_shapes": [{"a.weight": (3, -5)}]}, MODEL, r"`param_shapes`\[0\]\['a.weight'\] must be a"),
        (None, {"param_shapes": {"a.weight": (15,)}}, MODEL, r"`param_shapes` must be a list"),
        (
            lambda r: {"param_alignment_paddings": [["x", 0]]},
            None,
            OPTIM,
            r"`param_alignment_paddings`\[0\] must be a list of non-negative integers, got \['x', 0\]",
        ),
        (lambda r: {"param_alignment_paddings": [[0]]}, None, OPTIM, r"one padding per parameter"),
        (None, {"shared_params": {"lm_head.weight": ["a.weight"]}}, MODEL, r"`shared_params` source must be a"),
        (None, {"buffer_names": "a.weight"}, MODEL, r"`buffer_names` must be a list"),
    ],
    ids=[
        "partition_count-type",
        "partition_count-zero",
        "zero_stage-type",
        "zero_stage-per-rank",
        "param_shapes-shape",
        "param_shapes-negative",
        "param_shapes-type",
        "paddings-type",
        "paddings-short",
        "shared_params",
        "buffer_names",
    ],
)
def test_fields_of_the_wrong_type_are_named(tmp_path, params, optim, model, file, message):
    folder = save_zero2(tmp_path, params, optim=optim, model=model)
    with pytest.raises(InputError, match=message) as info:
        ZeroCheckpoint(folder).tensors()
    assert str(folder) in str(info.value) and file in str(info.value)
