"""torch.distributed.checkpoint folders written in one process (no process group): the layouts of
the state dict (Accelerate's `{"model": ...}`, torchtitan's model beside optimizer, a bare state dict)."""

import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from pmakit.errors import InputError
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


def _entry(meta):
    return meta.state_dict_metadata["w"]


def _storage(meta):
    return next(iter(meta.storage_data.values()))


# Each edit gives one field of real DCP metadata a wrong type (torch's own classes, pickled by torch's pickler).
_EDITS = {
    "entry-not-metadata": (
        lambda m: m.state_dict_metadata.__setitem__("w", 5),
        r"`state_dict_metadata\['w'\]` must be DCP storage metadata, got 5",
    ),
    "chunk-offsets": (
        lambda m: setattr(_entry(m).chunks[0], "offsets", [[0], 0]),
        r"`state_dict_metadata\['w'\]\.chunks\[0\]\.offsets` must",
    ),
    "chunk-sizes-negative": (
        lambda m: setattr(_entry(m).chunks[0], "sizes", [-6, 4]),
        r"`state_dict_metadata\['w'\]\.chunks\[0\]\.sizes` must",
    ),
    "chunks-not-a-list": (
        lambda m: setattr(_entry(m), "chunks", 3),
        r"`state_dict_metadata\['w'\]\.chunks` must be a list, got 3",
    ),
    "size": (lambda m: setattr(_entry(m), "size", None), r"`state_dict_metadata\['w'\]\.size` must"),
    "properties": (
        lambda m: setattr(_entry(m), "properties", None),
        r"`state_dict_metadata\['w'\]\.properties\.dtype` is an unsupported",
    ),
    "storage-offset": (
        lambda m: setattr(_storage(m), "offset", "12x"),
        r"`storage_data\['w' at \[0, 0\]\]\.offset` must be a non-negative integer, got '12x'",
    ),
    "storage-length": (
        lambda m: setattr(_storage(m), "length", 2.5),
        r"`storage_data\['w' at \[0, 0\]\]\.length` must",
    ),
    "storage-path": (
        lambda m: setattr(_storage(m), "relative_path", 7),
        r"`storage_data\['w' at \[0, 0\]\]\.relative_path` must be a string",
    ),
    "storage-data": (lambda m: setattr(m, "storage_data", [1, 2]), r"`storage_data` must be a mapping"),
    "planner-data": (lambda m: setattr(m, "planner_data", {"w": [{"k": 1}]}), r"`planner_data\['w'\]` must be a path"),
}


@pytest.mark.parametrize("edit", list(_EDITS))
def test_metadata_fields_of_the_wrong_type_are_named(tmp_path, edit):
    _save({"w": torch.randn(6, 4)}, tmp_path)
    meta_file = tmp_path / ".metadata"
    with open(meta_file, "rb") as f:
        meta = pickle.load(f)  # torch's classes: the file is ours
    change, message = _EDITS[edit]
    change(meta)
    with open(meta_file, "wb") as f:
        pickle.dump(meta, f)
    with pytest.raises(InputError, match=message) as info:
        DcpCheckpoint(tmp_path).tensor_info("w")
    assert str(meta_file) in str(info.value)


def test_a_chunk_window_past_the_end_of_its_file_is_named(tmp_path):
    _save({"w": torch.randn(6, 4)}, tmp_path)
    meta_file = tmp_path / ".metadata"
    with open(meta_file, "rb") as f:
        meta = pickle.load(f)
    info = _storage(meta)
    data_file = tmp_path / info.relative_path
    info.length = data_file.stat().st_size + 4096
    with open(meta_file, "wb") as f:
        pickle.dump(meta, f)
    with pytest.raises(InputError, match=r"runs past the end of the file") as error:
        DcpCheckpoint(tmp_path).tensor_info("w")
    assert str(data_file) in str(error.value)
