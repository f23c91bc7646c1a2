"""Start-up of the `pmakit` command: `pmakit --version` and `pmakit average --help`, median of N runs.

Every command pays this before any work, so a dependency release that makes an import slow shows up
here (ml_dtypes 0.7 took 0.6 s to import, against 0.08 s for 0.6, and the parser imported it: 0.80 s
for `pmakit --version`). Goal: at most 0.25 s each on 2 cores. `tests/test_cli_startup.py` pins the
cause structurally (no heavy module is imported while parsing); this measures the effect.

    python -m benchmarks.startup [--runs 10]     # writes benchmarks/results/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


RESULTS = Path(__file__).resolve().parent / "results"
GOAL_SECONDS = 0.25
COMMANDS = (("--version",), ("average", "--help"))


def pmakit_command() -> list[str]:
    """The installed ``pmakit`` script beside this interpreter (what users run), else ``python -m pmakit.cli``."""
    script = Path(sys.executable).with_name("pmakit")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pmakit.cli"]


def time_once(command: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run of ``command`` in a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(command: list[str], runs: int) -> dict:
    time_once(command)  # warm the file cache (bytecode, shared libraries): the steady state users see
    samples = [time_once(command) for _ in range(runs)]
    walls, cpus = [s[0] for s in samples], [s[1] for s in samples]
    return {
        "seconds": statistics.median(walls),
        "cpu": statistics.median(cpus),
        "min": min(walls),
        "max": max(walls),
        "runs": runs,
    }


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "ml_dtypes": _version("ml_dtypes"),
        "numpy": _version("numpy"),
        "pmakit": _version("pmakit"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", type=Path, default=RESULTS / "startup.json")
    args = parser.parse_args()
    base = pmakit_command()
    rows = []
    for words in COMMANDS:
        row = {"command": " ".join(["pmakit", *words]), **measure([*base, *words], args.runs)}
        rows.append(row)
        print(f"{row['command']}: median {row['seconds']:.3f} s wall, {row['cpu']:.3f} s CPU (goal {GOAL_SECONDS} s)")
    result = {"goal_seconds": GOAL_SECONDS, "env": environment(), "rows": rows}
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
