"""`examples/spike_recovery.py` in a tiny configuration: the guarded run must end clearly below the unguarded one."""

from __future__ import annotations

import json
import math

import pytest

from examples import spike_recovery


@pytest.mark.filterwarnings("ignore:PMA")
def test_guarded_run_recovers_and_ends_far_below_the_unguarded_one(tmp_path, capsys):
    plot, numbers = tmp_path / "curves.png", tmp_path / "numbers.json"
    tiny = [
        "--steps",
        "80",
        "--burst_at",
        "40",
        "--warmup",
        "15",
        "--interval",
        "5",
        "--rewarm",
        "15",
        "--tail",
        "10",
        "--batch",
        "8",
        "--seq",
        "32",
        "--bytes",
        "100000",
        "--threads",
        "1",
    ]
    results = spike_recovery.main([*tiny, "--plot", str(plot), "--json", str(numbers)])
    unguarded, guarded = results["unguarded"], results["guarded"]
    assert unguarded["events"] == [] and len(guarded["events"]) >= 1
    # Every recovery merged only samples taken before its spike began.
    for event in guarded["events"]:
        assert event["merged_steps"] and max(event["merged_steps"]) < event["spike_began"] - 1
    # Identical until the first spike (same seed, same data order) ...
    first = guarded["events"][0]["spike_began"]
    same = [a == b for (sa, a), (sb, b) in zip(unguarded["losses"], guarded["losses"], strict=True) if sa < first]
    assert same and all(same)
    # ... then the guarded run ends much lower, in training and on held-out text.
    assert guarded["final_train_loss"] < unguarded["final_train_loss"] - 0.3
    assert guarded["held_out_loss"] < unguarded["held_out_loss"] - 0.3
    assert math.isfinite(guarded["final_train_loss"])
    out = capsys.readouterr().out
    assert "unguarded: final training loss" in out and "guarded: final training loss" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(numbers.read_text())["guarded"]["events"]
