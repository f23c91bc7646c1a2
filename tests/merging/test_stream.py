"""The fold's steps: each input's block is unmapped before the next input is read, and results are exact."""

from __future__ import annotations

import numpy as np
import pytest

from pmakit.averaging import AveragingRule
from pmakit.errors import MergeError
from pmakit.io.safetensors import ShardWriter
from pmakit.merging.plan import build_plan
from pmakit.merging.sources import resolve_source
from pmakit.merging.stream import _Fold, run_fold
from tests.helpers.folders import read_folder, write_raw_safetensors


NUMEL = 3000


def _inputs(root, n):
    """``n`` folders of one fp32 tensor ``w`` (values ``i + k/NUMEL``) and one int64 ``count``."""
    folders = []
    for i in range(n):
        folder = root / f"in{i}"
        folder.mkdir()
        w = (i + np.arange(NUMEL, dtype=np.float64) / NUMEL).astype(np.float32).tobytes()
        count = np.array([10 * i, i], dtype=np.int64).tobytes()
        header = {
            "w": {"dtype": "F32", "shape": [NUMEL], "data_offsets": [0, len(w)]},
            "count": {"dtype": "I64", "shape": [2], "data_offsets": [len(w), len(w) + 16]},
        }
        write_raw_safetensors(folder / "model.safetensors", header, w + count)
        folders.append(folder)
    return folders


def _plan(folders, rule):
    sources = [resolve_source(str(f)).load() for f in folders]
    return build_plan(sources, rule)


def _fold_into(tmp_path, plan, **kwargs):
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardWriter(out, [t.out for t in plan.tensors], plan.shard_names)
    run_fold(plan, writer, **kwargs)
    writer.close()
    return read_folder(out)


@pytest.mark.parametrize("rule", [AveragingRule("sma"), AveragingRule("wma"), AveragingRule("ema", 0.3)])
def test_at_most_two_input_blocks_are_mapped_at_once(tmp_path, monkeypatch, rule):
    """Memory stays flat in the number of inputs: a block of input k is unmapped before input k+2 is read."""
    plan = _plan(_inputs(tmp_path, 5), rule)
    mapped, most = set(), [0]
    real_read, real_release = _Fold._read, _Fold._release_one

    def tracked_read(self, info, e0, e1, key="in"):
        mapped.add((info.file, e0))
        most[0] = max(most[0], len(mapped))
        return real_read(self, info, e0, e1, key)

    def tracked_release(self, info, e0, e1):
        mapped.discard((info.file, e0))
        return real_release(self, info, e0, e1)

    monkeypatch.setattr(_Fold, "_read", tracked_read)
    monkeypatch.setattr(_Fold, "_release_one", tracked_release)
    out = _fold_into(tmp_path, plan, threads=1, block_elements=1000)
    assert most[0] <= 2 and not mapped, (most, mapped)
    expected = sum(w * (i + np.arange(NUMEL) / NUMEL) for i, w in enumerate(rule.weights_for(5)))
    np.testing.assert_allclose(out["w"].double().numpy(), expected, rtol=6 * 2.0**-24)
    assert out["count"].tolist() == [40, 4]  # the newest input's integers


@pytest.mark.parametrize("reader", ["mmap", "pread"])
def test_equal_weights_sum_first_and_scale_once(tmp_path, reader):
    """SMA of 3 inputs, several threads and blocks: within fp32 rounding of the fp64 mean of the stored inputs."""
    folders = _inputs(tmp_path, 3)
    out = _fold_into(tmp_path, _plan(folders, AveragingRule("sma")), threads=2, block_elements=700, reader=reader)
    stored = [read_folder(f)["w"].double().numpy() for f in folders]
    np.testing.assert_allclose(out["w"].double().numpy(), sum(stored) / 3, rtol=4 * 2.0**-24)


def test_bad_fold_settings_name_the_setting(tmp_path):
    plan = _plan(_inputs(tmp_path, 2), AveragingRule("sma"))
    with pytest.raises(MergeError, match="`block_elements` must be positive, got 0"):
        run_fold(plan, None, block_elements=0)
    with pytest.raises(MergeError, match="`reader` must be 'mmap' or 'pread', got 'aio'"):
        run_fold(plan, None, reader="aio")
