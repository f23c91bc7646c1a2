"""`pmakit.io.safetensors.ShardWriter` writes the bytes safetensors' own writer writes for the same tensors."""

from __future__ import annotations

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from pmakit.io.safetensors import DTYPES, OutputTensor, ShardWriter


def _arrays() -> dict[str, np.ndarray]:
    """Every dtype the writer knows, two names each (planned below in an order safetensors does not use)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for code, dtype in DTYPES.items():
        for stem in ("b.weight", "a.bias"):
            raw = rng.integers(0, 256, size=(3, 5) if code != "BOOL" else (4,), dtype=np.uint8)
            arrays[f"{stem}.{code}"] = raw.astype(np.bool_) if code == "BOOL" else raw.view(np.uint8).astype(dtype)
    arrays["zéro"] = np.zeros((2,), dtype=ml_dtypes.bfloat16)  # a non-ASCII name stays UTF-8 in the header
    arrays["empty"] = np.zeros((0, 4), dtype=np.float32)
    return arrays


def test_shard_bytes_equal_safetensors_save_file(tmp_path):
    arrays = _arrays()
    codes = {np.dtype(v): k for k, v in DTYPES.items()}
    planned = [OutputTensor(name, codes[a.dtype], a.shape) for name, a in reversed(arrays.items())]
    writer = ShardWriter(tmp_path, planned, ["model.safetensors"])
    for tensor in planned[::2] + planned[1::2]:  # written out of order, as threads would
        writer.write(tensor, 0, arrays[tensor.name])
    writer.close()
    save_file(arrays, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
