"""The torch-free reader of torch.save archives: byte ranges equal to torch.load, refusals by name,
and `.bin` model folders merged zero-copy to the same bytes as their safetensors twins."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pmakit.errors import InputError, MergeError
from pmakit.io.safetensors import DTYPES
from pmakit.io.torch_pickle import TorchArchive, read_state_dict
from pmakit.merging import merge
from tests.helpers.folders import read_folder, save_models
from tests.helpers.models import tiny_llama


def save_bin_models(root: Path, n: int, dtype=torch.float32) -> list[Path]:
    """The twins of `save_models` in the pre-safetensors layout: config.json + `torch.save(state_dict())`
    as `pytorch_model.bin` (what `save_pretrained(safe_serialization=False)` wrote; transformers 5 no
    longer does). The tied LM head is saved under both names, sharing the embedding's storage."""
    folders = save_models(root, n, dtype=dtype)
    for i, folder in enumerate(folders):
        (folder / "model.safetensors").unlink()
        torch.save(tiny_llama(seed=i, dtype=dtype).state_dict(), folder / "pytorch_model.bin")
    return folders


def _array(info) -> np.ndarray:
    with open(info.file, "rb") as f:
        f.seek(info.start)
        raw = f.read(info.nbytes)
    return np.frombuffer(raw, DTYPES[info.dtype]).reshape(info.shape)


def _as_torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype == DTYPES["BF16"]:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def test_every_tensor_is_the_byte_range_torch_load_reads(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "f32": base,
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f16": torch.randn(7).half(),
        "i64": torch.arange(5),
        "bool": torch.tensor([True, False, True]),
        "row_view": base[2],  # a contiguous view at an offset of a shared storage
        "tied": base,  # one storage, two names
        "param": torch.nn.Parameter(torch.ones(2, 2)),
        "scalar": torch.tensor(3.5),
    }
    torch.save(state, tmp_path / "x.bin")
    infos = read_state_dict(tmp_path / "x.bin")
    assert list(infos) == list(state)
    loaded = torch.load(tmp_path / "x.bin", weights_only=True)
    for name, info in infos.items():
        got = _as_torch(_array(info))
        assert got.dtype == loaded[name].dtype and torch.equal(got, loaded[name].detach()), name
    assert (infos["tied"].file, infos["tied"].start) == (infos["f32"].file, infos["f32"].start)
    assert infos["row_view"].start == infos["f32"].start + 2 * 6 * 4


class _Custom:
    def __init__(self):
        self.value = 1


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        (_RunsCode(), r"(posix|os)\.system"),
        (_Custom(), r"[\w.]*test_torch_pickle\._Custom"),
        (print, r"(__builtin__|builtins)\.print"),
    ],
)
def test_any_other_class_is_refused_by_name(tmp_path, payload, named):
    torch.save({"w": torch.ones(2), "x": payload}, tmp_path / "evil.bin")
    with pytest.raises(InputError, match=rf"pickles {named}.*not allowed"):
        read_state_dict(tmp_path / "evil.bin")


def test_non_contiguous_views_and_non_tensors_are_refused_by_name(tmp_path):
    torch.save({"t": torch.ones(3, 4).t()}, tmp_path / "t.bin")
    with pytest.raises(InputError, match=r"Tensor 't' .* non-contiguous view .*stride \[1, 4\]"):
        read_state_dict(tmp_path / "t.bin")
    torch.save({"n": 3}, tmp_path / "n.bin")
    with pytest.raises(InputError, match=r"Entry 'n' .* not a tensor"):
        read_state_dict(tmp_path / "n.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a zip at all" * 10)
    with pytest.raises(InputError, match=r"not a torch zip archive"):
        TorchArchive(tmp_path / "junk.bin")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bin_folders_merge_to_the_bytes_of_their_safetensors_twins(tmp_path, dtype):
    safe = save_models(tmp_path / "safe", 3, dtype=dtype)
    pickled = save_bin_models(tmp_path / "bin", 3, dtype=dtype)
    assert all(not any(p.glob("*.safetensors")) and (p / "pytorch_model.bin").is_file() for p in pickled)
    merge(safe, tmp_path / "from_safe", algo="wma")
    merge(pickled, tmp_path / "from_bin", algo="wma", allow_pickle=True)
    a, b = read_folder(tmp_path / "from_safe"), read_folder(tmp_path / "from_bin")
    assert set(a) == set(b)  # same tensors (the file order follows each input's order)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


CHILD = """
import sys
from pmakit.merging import merge
merge(sys.argv[2:], sys.argv[1], algo="sma", allow_pickle=True)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print("IMPORTED", heavy[:5])
"""


def test_merging_bin_inputs_imports_no_torch(tmp_path):
    pickled = save_bin_models(tmp_path / "bin", 2)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "out"), *map(str, pickled)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert "IMPORTED []" in out.stdout, out.stdout + out.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_bin_reading_copies_nothing(tmp_path):
    """No scratch copy: the plan's tensors point into the `.bin` files themselves."""
    from pmakit.merging import plan_merge

    pickled = save_bin_models(tmp_path / "bin", 2)
    plan = plan_merge(pickled, allow_pickle=True)
    files = {f for t in plan.tensors for i in t.inputs for f in i.files}
    assert files == {p.resolve() / "pytorch_model.bin" for p in pickled}
    with pytest.raises(MergeError, match=r"allow_pickle=True"):
        plan_merge(pickled)


def test_plain_values_beside_tensors_are_read_as_python_values(tmp_path):
    state = {"w": torch.ones(2), "meta": {"bytes": b"\x00\xffab", "ints": [1, 2], "size": torch.Size([3, 4])}}
    torch.save(state, tmp_path / "x.pt")
    obj = TorchArchive(tmp_path / "x.pt").obj
    assert obj["meta"] == {"bytes": b"\x00\xffab", "ints": [1, 2], "size": (3, 4)}
