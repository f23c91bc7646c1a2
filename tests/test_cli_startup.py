"""The `pmakit` command starts fast: building its parser imports nothing heavy.

Checked by what is imported, not by timing (timings are in `benchmarks/startup.py`): each heavy module
below costs a measurable share of the 0.25 s start-up goal on 2 cores (numpy 0.08-0.28 s, ml_dtypes 0.7
0.6 s, huggingface_hub and its HTTP client 0.2 s, torch and transformers seconds).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


HEAVY = ("numpy", "ml_dtypes", "safetensors", "huggingface_hub", "httpx2", "torch", "transformers")

# Runs the command's `main` in a fresh interpreter, then prints which heavy modules it imported.
PROBE = """
import json, sys
from pmakit.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)))
"""


def imported_heavy(*argv: str) -> list[str]:
    script = PROBE.format(heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "argv",
    [("--version",), ("--help",), ("average", "--help"), ("merge", "--help"), ("inspect", "--help")],
    ids=" ".join,
)
def test_parsing_imports_nothing_heavy(argv):
    assert imported_heavy(*argv) == []


def test_a_bad_flag_is_refused_before_anything_heavy_loads():
    assert imported_heavy("average", "run", "--algo", "median") == []
