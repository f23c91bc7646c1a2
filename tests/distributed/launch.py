"""Run a worker script under `torch.distributed.run` (2 CPU processes, gloo, by default), with a timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def torchrun(
    script: str, *args: str, nproc: int = 2, timeout: float = 240, cpu: bool = True
) -> subprocess.CompletedProcess:
    """Launch ``script`` on ``nproc`` local processes (CPU unless ``cpu=False``) and wait; fail on a hang or error."""
    env = dict(os.environ)
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        TORCH_CPP_LOG_LEVEL="ERROR",
        PYTHONWARNINGS="ignore",
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(HERE / script),
        *args,
    ]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a hang at a collective or at shutdown
        # SIGTERM, not SIGKILL: torchrun then stops its workers (they run in sessions of their own). A
        # killed launcher would leave them running, and a DeepSpeed worker caught building its CPU op
        # would keep the build's lock in the torch extensions folder forever.
        proc.terminate()
        try:
            _, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
        raise AssertionError(f"{script} did not finish within {timeout}s:\n{(stderr or '')[-4000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"{script} exited with {proc.returncode}:\n{stdout[-2000:]}\n{stderr[-6000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
