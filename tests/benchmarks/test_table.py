"""benchmarks/table.py: every figure beside its goal, ratios computed from the results' JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "table.py"


def _table_module():
    spec = importlib.util.spec_from_file_location("pmakit_bench_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(seconds: float, cpu: float, peak_mib: int) -> dict:
    return {"seconds": seconds, "cpu": cpu, "peak": peak_mib << 20}


def _write(folder: Path, name: str, data: dict) -> None:
    (folder / name).write_text(json.dumps(data))


def test_table_ratios_goals_and_sources(tmp_path):
    rows = [
        {"n": 2, "bound_warm": _run(1.0, 0.5, 9), "pmakit_warm": _run(1.2, 0.6, 40)},
        {"n": 16, "bound_warm": _run(4.0, 2.0, 9), "pmakit_warm": _run(6.0, 2.2, 41)},
    ]
    _write(tmp_path, "merge.json", {"rows": rows, "imports": {"seconds": 0.5, "cpu": 0.25}})
    _write(
        tmp_path,
        "recorded.json",
        {"mergekit": {"rows": [{"n": 2, "seconds": 24.0, "cpu": 12.0, "pmakit_seconds": 1.2, "pmakit_cpu": 0.5}]}},
    )
    _write(
        tmp_path,
        "export.json",
        {
            "params": 1e8,
            "dtype": "fp32",
            "bytes": 4e8,
            "bound_s": 1.0,
            "ratio": 1.5,
            "ratio_range": [1.2, 1.8],
            "goal": 1.25,
        },
    )
    table = _table_module().build_table(tmp_path)
    assert "| offline merge N=2, warm: pmakit / bound | 1.20x wall (1.20x CPU) | <= 1.3x |" in table
    assert "| offline merge N=16, warm: pmakit / bound | 1.50x wall (1.10x CPU) | <= 1.3x |" in table
    assert table.count("| yes |") >= 2 and "**no**" in table  # N=16 misses its goal, export too
    assert "mergekit / pmakit | 20.0x wall (20.0x CPU) | >= 10x" in table  # CPU against this run's 0.6 s
    assert "export pma-<step>, 100M params fp32: export / bound | 1.50x [1.20 .. 1.80] | <= 1.25x" in table
    assert "merge peak RSS, N=16 / N=2 | 1.02x (40 -> 41 MiB)" in table
    assert "step overhead" not in table  # no overhead JSON here: no row invented


def test_missing_results_say_not_measured(tmp_path):
    table = _table_module().build_table(tmp_path)
    assert "offline merge / bound | not measured" in table
    assert "export pma-<step> / bound | not measured" in table


def test_startup_rows_stand_beside_their_goal(tmp_path):
    env = {"cores": 2, "load_average": 0.5, "ml_dtypes": "0.7.0"}
    rows = [
        {"command": "pmakit --version", "seconds": 0.12, "cpu": 0.1, "runs": 10},
        {"command": "pmakit average --help", "seconds": 0.31, "cpu": 0.3, "runs": 10},
    ]
    _write(tmp_path, "startup.json", {"goal_seconds": 0.25, "env": env, "rows": rows})
    table = _table_module().build_table(tmp_path)
    assert "| start-up, pmakit --version (median of 10) | 0.120 s wall (0.100 s CPU) | <= 0.25 s |" in table
    assert "pmakit average --help (median of 10) | 0.310 s wall (0.300 s CPU) | <= 0.25 s |" in table
    assert "2 cores, load 0.5; ml_dtypes 0.7.0 | yes | startup.json" in table
    assert "2 cores, load 0.5; ml_dtypes 0.7.0 | **no** | startup.json" in table


def test_missing_startup_says_not_measured(tmp_path):
    assert "start-up, pmakit --version | not measured | <= 0.25 s" in _table_module().build_table(tmp_path)
