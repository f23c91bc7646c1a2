"""bf16 merges need no ml_dtypes: the fold reads and writes bf16 as bit patterns (`pmakit.merging.convert`).

``import ml_dtypes`` takes 0.6 s with its 0.7 release, longer than a 2 x 100 MB bf16 merge. The merge
runs in a fresh interpreter through the command line; its output is compared bit for bit with torch's
own arithmetic (fp32 sums and products, round-to-nearest-even to bf16).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers.folders import read_folder


MERGE = """
import json, sys
from pmakit.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "ml_dtypes": "ml_dtypes" in sys.modules, "torch": "torch" in sys.modules}))
"""


def bf16_inputs(root, n: int) -> list[str]:
    """``n`` folders of bf16 tensors, with values spread over many binades and exact ties for the rounding."""
    g = torch.Generator().manual_seed(7)
    folders = []
    for i in range(n):
        folder = root / f"checkpoint-{10 * (i + 1)}"
        folder.mkdir(parents=True)
        w = torch.randn(257, 129, generator=g) * torch.logspace(-20, 20, 129, base=2)
        tensors = {"w": w.to(torch.bfloat16), "b": torch.randn(1000, generator=g).to(torch.bfloat16)}
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"}))
        folders.append(str(folder))
    return folders


def merge_in_subprocess(*argv: str) -> dict:
    done = subprocess.run([sys.executable, "-c", MERGE, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("flags", "weights"),
    [((), (0.5, 0.5, 0.5)), (("--weights", "1", "2", "5"), (1 / 8, 2 / 8, 5 / 8))],
    ids=["sma", "weighted"],
)
def test_bf16_merge_is_bitwise_and_imports_no_ml_dtypes(tmp_path, flags, weights):
    inputs = bf16_inputs(tmp_path / "in", 3)
    out = tmp_path / "out"
    report = merge_in_subprocess("average", *inputs, "-o", str(out), "--no-progress", *flags)
    assert report == {"code": 0, "ml_dtypes": False, "torch": False}
    merged = read_folder(out)
    states = [read_folder(f) for f in inputs]
    for name in ("w", "b"):
        x = [s[name].float() for s in states]
        if flags:  # each input scaled in fp32, then added in order
            w = [torch.tensor(v, dtype=torch.float32) for v in weights]
            expected = x[0] * w[0] + x[1] * w[1] + x[2] * w[2]
        else:  # equal weights: added in order, scaled once (1/3 rounded to fp32)
            expected = (x[0] + x[1] + x[2]) * torch.tensor(1 / 3, dtype=torch.float32)
        assert merged[name].dtype == torch.bfloat16
        assert torch.equal(merged[name].view(torch.int16), expected.to(torch.bfloat16).view(torch.int16)), name


def test_fp64_values_round_once_to_bf16():
    """fp64 accumulators: just above or below a bf16 tie, rounding through fp32 first would land on the tie."""
    import ml_dtypes
    import numpy as np

    from pmakit.merging.convert import store_bf16

    rng = np.random.default_rng(3)
    low = (rng.standard_normal(20000).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
    high = (low.view(np.uint32) + 0x10000).view(np.float32)  # the next bf16 away from zero
    tie = (low.astype(np.float64) + high.astype(np.float64)) / 2
    nudge = np.abs(tie) * 2.0**-40 * rng.choice([-1.0, 1.0], tie.size)
    values = np.concatenate([tie + nudge, tie, [np.nan, -np.inf, 1e300, 1e-300, 0.0]])
    with np.errstate(over="ignore"):  # 1e300 becomes Inf
        expected = values.astype(ml_dtypes.bfloat16).view(np.uint16)  # ml_dtypes: one rounding from fp64
        twice = values.astype(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    assert (twice != expected).sum() > 1000  # the inputs do tell one rounding from two
    got = store_bf16(values.copy(), np.empty(values.size, np.uint16))
    np.testing.assert_array_equal(got, expected)
