"""The WSA merge experiment (`examples/wsa_merge.py`) in a tiny configuration, end to end."""

from __future__ import annotations

import json

import pytest
import torch

from examples import wsa_merge


def test_wsa_merge_tiny(tmp_path):
    threads = torch.get_num_threads()
    try:
        results = wsa_merge.main(
            [
                "--max_bytes",
                "120000",
                "--shared_steps",
                "6",
                "--steps",
                "8",
                "--batch_size",
                "4",
                "--block_size",
                "32",
                "--hidden_size",
                "32",
                "--alphas",
                "3",
                "--val_blocks",
                "16",
                "--wsa_weight",
                "5.0",
                "--plot",
                str(tmp_path / "curve.png"),
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "r.json").read_text())["pairs"].keys() == {"plain", "wsa"}
    plain, wsa = results["pairs"]["plain"], results["pairs"]["wsa"]
    for pair in (plain, wsa):
        curve = pair["curve"]
        assert len(curve) == 3 and all(2.0 < v < 7.0 for v in curve)
        assert curve[0] == pytest.approx(pair["val_loss_a"]) and curve[-1] == pytest.approx(pair["val_loss_b"])
        assert pair["val_loss_merged"] == pytest.approx(curve[1])  # alpha 0.5 is the plain average
    assert plain["wsa_loss_last"] == [None, None] and all(v > 0 for v in wsa["wsa_loss_last"])
    # the WSA pair was pulled towards the shared initial scopes: its two runs' scopes are closer together
    assert wsa["scope_spread"]["mean_std_ratio"] < plain["scope_spread"]["mean_std_ratio"]
