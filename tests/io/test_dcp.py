"""torch.distributed.checkpoint folders written in one process (no process group): the layouts of
the state dict (Accelerate's `{"model": ...}`, torchtitan's model beside optimizer, a bare state dict)."""

import warnings

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from pmakit.io.dcp import DcpCheckpoint, is_dcp_folder
from pmakit.io.safetensors import DTYPES
from pmakit.merging.checkpoints import read_checkpoint_tensors


def _save(state, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder)))


def _values(info) -> np.ndarray:
    parts = [np.fromfile(f, DTYPES[info.dtype], hi - lo, offset=s) for f, s, lo, hi in info.spans(0, info.numel)]
    return np.concatenate(parts).reshape(info.shape)


@pytest.fixture
def weights():
    g = torch.Generator().manual_seed(0)
    return {"layer.weight": torch.randn(6, 4, generator=g), "layer.bias": torch.randn(6, generator=g)}


@pytest.mark.parametrize("layout", ["accelerate", "torchtitan", "bare"])
def test_model_tensors_are_found_in_every_layout(tmp_path, weights, layout):
    optimizer = {"state": {"layer.weight": {"exp_avg": torch.zeros(6, 4)}}}
    state = {
        "accelerate": {"model": weights},
        "torchtitan": {"model": weights, "optimizer": optimizer, "train_state": {"step": 7}},
        "bare": weights,
    }[layout]
    folder = tmp_path / "checkpoint-7" / ("pytorch_model_fsdp_0" if layout == "accelerate" else "")
    _save(state, folder)
    assert is_dcp_folder(folder)
    _, tensors = read_checkpoint_tensors(tmp_path / "checkpoint-7", allow_pickle=True)
    assert set(tensors) == set(weights)
    for name, value in weights.items():
        assert np.array_equal(_values(tensors[name]), value.numpy()), name


def test_bf16_and_scalar_tensors(tmp_path):
    state = {"w": torch.randn(3, 5).to(torch.bfloat16), "s": torch.tensor(2.5)}
    _save(state, tmp_path)
    checkpoint = DcpCheckpoint(tmp_path)
    w = checkpoint.tensor_info("w")
    assert w.dtype == "BF16" and np.array_equal(_values(w).view(np.int16), state["w"].view(torch.int16).numpy())
    s = checkpoint.tensor_info("s")
    assert s.shape == () and _values(s).item() == 2.5
