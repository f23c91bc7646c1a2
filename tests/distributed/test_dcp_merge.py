"""Merging FSDP2 sharded checkpoints (torch.distributed.checkpoint folders) directly, without torch.

The checkpoints are real: written by 2 CPU processes over gloo with `fully_shard`, in Accelerate's
`SHARDED_STATE_DICT` layout (`dcp_checkpoint_worker.py`), with the consolidated weights and PMA
averages saved beside them as the reference.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pmakit.averaging import merge_weights
from pmakit.cli import main as cli_main
from pmakit.errors import MergeError
from pmakit.merging import merge
from tests.distributed.launch import torchrun
from tests.helpers.folders import read_folder


STEPS = 5
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_dcp")
    torchrun("dcp_checkpoint_worker.py", str(out))
    return out


def _reference(out: Path, what: str, steps) -> list[dict[str, torch.Tensor]]:
    return [torch.load(out / "ref" / f"{what}-{s}.pt") for s in steps]


def _closed_form(states, weights) -> dict[str, torch.Tensor]:
    return {k: sum(w * s[k].double() for w, s in zip(weights, states, strict=True)) for k in states[0]}


def test_sharded_checkpoints_merge_to_the_fp64_closed_form(fsdp_run, tmp_path):
    run = fsdp_run / "run"
    assert (run / "checkpoint-5" / "pytorch_model_fsdp_0" / ".metadata").is_file()
    assert not list(run.glob("checkpoint-*/*.safetensors")), "nothing but the DCP shards"
    result = merge(run_dir=run, last=3, algo="wma", output=tmp_path / "out", allow_pickle=True)
    assert [s.step for s in result.plan.sources] == [3, 4, 5]
    assert any(len(i.pieces) == 2 for t in result.plan.tensors for i in t.inputs), "read from both ranks' shards"
    states = _reference(fsdp_run, "weights", (3, 4, 5))
    expected = _closed_form(states, merge_weights(3, "wma"))
    merged = read_folder(tmp_path / "out")
    assert set(merged) == set(expected) - {"lm_head.weight"}  # tied to the embedding, as in the config
    for name, value in merged.items():
        scale = torch.stack([s[name].abs() for s in states]).amax(0).double()
        assert ((value.double() - expected[name]).abs() <= 4 * EPS32 * scale + 1e-30).all(), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config == json.loads((run / "checkpoint-5" / "config.json").read_text())


@pytest.mark.parametrize("reader", ["mmap", "pread"])
def test_sharded_and_consolidated_inputs_give_the_same_bytes(fsdp_run, tmp_path, reader):
    """The same fold over consolidated safetensors twins of the same checkpoints: bitwise equal."""
    twins = []
    for step, state in zip((4, 5), _reference(fsdp_run, "weights", (4, 5)), strict=True):
        folder = tmp_path / f"twin-{step}"
        folder.mkdir()
        state.pop("lm_head.weight")
        save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
        shutil.copy(fsdp_run / "run" / f"checkpoint-{step}" / "config.json", folder)
        twins.append(folder)
    sharded = [fsdp_run / "run" / f"checkpoint-{s}" for s in (4, 5)]
    # Blocks of 100 elements: many of them straddle the two ranks' chunks of a tensor.
    merge(sharded, tmp_path / "a", algo="ema", alpha=0.3, allow_pickle=True, block_elements=100, reader=reader)
    merge(twins, tmp_path / "b", algo="ema", alpha=0.3, block_elements=100)
    a, b = read_folder(tmp_path / "a"), read_folder(tmp_path / "b")
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_pma_average_in_the_optimizer_state_becomes_a_model_folder(fsdp_run, tmp_path):
    run = fsdp_run / "run"
    code = cli_main(["average", str(run), "--pma-state", "--last", "1", "--allow-pickle", "-o", str(tmp_path / "p")])
    assert code == 0
    expected = _reference(fsdp_run, "pma", (5,))[0]
    merged = read_folder(tmp_path / "p")
    assert set(merged) == set(expected)
    for name, value in merged.items():
        assert value.dtype == torch.float32 and torch.equal(value, expected[name]), name
    recipe = (tmp_path / "p" / "pmakit_recipe.yaml").read_text()
    assert "kind: pma-state" in recipe
    # Two stored averages, weighted like any two inputs.
    merge(run_dir=run, kind="pma-state", last=2, output=tmp_path / "two", allow_pickle=True)
    expected = _closed_form(_reference(fsdp_run, "pma", (4, 5)), [0.5, 0.5])
    for name, value in read_folder(tmp_path / "two").items():
        assert torch.allclose(value.double(), expected[name], rtol=2 * EPS32, atol=1e-12), name


def test_sharded_inputs_are_refused_clearly(fsdp_run, tmp_path):
    run = fsdp_run / "run"
    with pytest.raises(
        MergeError, match=r"torch\.distributed\.checkpoint folder \(pytorch_model_fsdp_0\).*allow_pickle"
    ):
        merge(run_dir=run, last=2, output=tmp_path / "x")
    plain = tmp_path / "plain"
    shutil.copytree(run / "checkpoint-5", plain, ignore=shutil.ignore_patterns("optimizer_0"))
    with pytest.raises(MergeError, match=r"no sharded optimizer state"):
        merge([plain], tmp_path / "y", kind="pma-state", allow_pickle=True)
    # A .distcp file cut short: the chunk that lies past its end is named.
    broken = tmp_path / "broken"
    shutil.copytree(run / "checkpoint-5", broken)
    shard = broken / "pytorch_model_fsdp_0" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(MergeError, match=r"__1_0\.distcp"):
        merge([broken], tmp_path / "z", allow_pickle=True)


# VmHWM of the child alone (ru_maxrss would include the forking pytest process)
CHILD = """
import sys
from pmakit.merging import merge
merge(sys.argv[2:], sys.argv[1], algo="wma", allow_pickle=True, threads=2)
assert not any(m.split(".")[0] == "torch" for m in sys.modules), "the merge imported torch"
print([int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""


def _big_dcp_checkpoints(root: Path, n: int) -> tuple[list[Path], list[torch.Tensor]]:
    """``n`` single-writer DCP checkpoints of 16 MiB each (two tensors), in Accelerate's layout, and
    the last row of each one's ``a.weight`` (to check the result without holding the inputs)."""
    import torch.distributed.checkpoint as dcp

    generator = torch.Generator().manual_seed(0)
    folders, rows = [], []
    for i in range(n):
        folder = root / f"checkpoint-{i + 1}"
        state = {"a.weight": torch.randn(2048, 1024, generator=generator), "b.weight": torch.randn(1 << 21)}
        dcp.save({"model": state}, storage_writer=dcp.FileSystemWriter(str(folder / "pytorch_model_fsdp_0")))
        folders.append(folder)
        rows.append(state["a.weight"][-1].clone())
    return folders, rows


def test_peak_rss_is_flat_in_the_number_of_sharded_inputs(tmp_path, capsys):
    """16 MiB per input: holding the inputs would add 96 MiB at N=8; the fold holds a few blocks."""
    peaks = {}
    for n in (2, 8):
        inputs, rows = _big_dcp_checkpoints(tmp_path / f"n{n}", n)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(tmp_path / f"out{n}"), *map(str, inputs)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        peaks[n] = int(out.stdout.split()[-1])
        expected = sum(w * r.double() for w, r in zip(merge_weights(n, "wma"), rows, strict=True))
        got = read_folder(tmp_path / f"out{n}")["a.weight"][-1].double()
        assert torch.allclose(got, expected, rtol=8 * EPS32, atol=1e-6)
    assert peaks[8] - peaks[2] < 8 << 20, {n: p / 2**20 for n, p in peaks.items()}
    with capsys.disabled():
        print(f"\n[dcp] peak RSS N=2 {peaks[2] / 2**20:.1f} MiB, N=8 {peaks[8] / 2**20:.1f} MiB")


def test_metadata_naming_a_file_outside_its_folder_is_refused(fsdp_run, tmp_path):
    import pickle

    folder = tmp_path / "evil"
    shutil.copytree(fsdp_run / "run" / "checkpoint-5", folder)
    meta_path = folder / "pytorch_model_fsdp_0" / ".metadata"
    meta = pickle.loads(meta_path.read_bytes())  # torch's own classes: the test process has torch
    for info in meta.storage_data.values():
        info.relative_path = "../../elsewhere.distcp"
    meta_path.write_bytes(pickle.dumps(meta))
    with pytest.raises(MergeError, match=r"names a data file '\.\./\.\./elsewhere\.distcp' outside its folder"):
        merge([folder], tmp_path / "out", allow_pickle=True)


def test_inspect_and_scopes_read_sharded_inputs(fsdp_run, capsys):
    run = fsdp_run / "run"
    assert cli_main(["inspect", str(run), "--last", "2", "--allow-pickle", "--scopes"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint-5" in out and "a merge would read" in out and "model.layers.0.mlp.up_proj" in out
