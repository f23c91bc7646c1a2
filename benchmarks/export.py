"""Export at disk speed: writing a ``pma-<step>`` folder against writing the same bytes to the same disk.

A ~110M-parameter Llama (fp32 weights, as the Trainer keeps them, or ``--dtype bf16``) gets a PMA engine
with one sample folded in; then, in the same process and in interleaved rounds:

* ``export``: ``PmaExporter`` writing ``pma-<step>`` (config, generation config, safetensors shards,
  model card), built aside and renamed into place, as at a cycle end;
* ``bound``: the same number of bytes, in files of the same sizes, written with ``os.write`` from one
  reused buffer into a fresh folder beside it (no fsync in either).

Folders are removed and the page cache's dirty pages flushed (``os.sync``) before each run, outside
the timed region, and the two alternate in going first, so neither pays for the other's writeback.
The table gives the median over rounds and the spread; the goal is export <= 1.25x the bound.

    python -m benchmarks.export [--rounds 10] [--dtype fp32|bf16] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GOAL = 1.25


def build(dtype_name: str):
    """The model, an engine with one sample folded in, and the exporter of a run folder."""
    import torch

    from examples.models import tiny_llama
    from pmakit import PmaConfig
    from pmakit.online.engine import attach_engine

    model = tiny_llama("110m", dtype=torch.bfloat16 if dtype_name == "bf16" else torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pma = PmaConfig(fused_algo="sma", fused_num=10, interleave_step=1)
    engine = attach_engine(optimizer, pma)
    engine.sample()
    return model, engine, pma


def write_bound(folder: Path, sizes: list[int]) -> None:
    """The same bytes as the export, in files of the same sizes: the disk's share of the export."""
    folder.mkdir()
    buf = memoryview(bytearray(16 << 20))
    for i, size in enumerate(sizes):
        fd = os.open(folder / f"file-{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left = size
            while left:
                left -= os.write(fd, buf[: min(left, len(buf))])
        finally:
            os.close(fd)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn()``."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def run(args) -> dict:
    from pmakit.training.export import PMA_PREFIX, PmaExporter

    model, engine, pma = build(args.dtype)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pmakit-export-"))
    work.mkdir(parents=True, exist_ok=True)
    exporter = PmaExporter(model, work / "run", pma)
    step, steps = 100, [100]
    folder = work / "run" / f"{PMA_PREFIX}{step}"
    exporter._write(engine, folder, step, steps)  # warm-up (allocations, imports) and the sizes
    sizes = [f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()]
    export_s, bound_s = [], []
    try:
        for i in range(args.rounds):
            runs = [
                (export_s, folder, lambda: exporter._write(engine, folder, step, steps)),
                (bound_s, work / "bound", lambda: write_bound(work / "bound", sizes)),
            ]
            for times, out, fn in runs if i % 2 == 0 else runs[::-1]:  # alternate who writes first
                shutil.rmtree(out, ignore_errors=True)
                os.sync()  # each run starts with no dirty pages left by the other (writeback throttling)
                times.append(timed(fn))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    ratios = [e[0] / b[0] for e, b in zip(export_s, bound_s, strict=True)]
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": args.dtype,
        "bytes": sum(sizes),
        "files": len(sizes),
        "export_s": statistics.median(e[0] for e in export_s),
        "bound_s": statistics.median(b[0] for b in bound_s),
        "export_cpu_s": statistics.median(e[1] for e in export_s),
        "bound_cpu_s": statistics.median(b[1] for b in bound_s),
        "ratio": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "rounds": args.rounds,
        "export_all": export_s,
        "bound_all": bound_s,
        "goal": GOAL,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
    }


def render(r: dict) -> str:
    lo, hi = r["ratio_range"]
    return "\n".join(
        [
            "# Export benchmark",
            "",
            f"`python -m benchmarks.export`: a {r['params'] / 1e6:.0f}M-parameter Llama ({r['dtype']} weights) "
            f"exported as `pma-<step>` by `PmaExporter` ({r['bytes'] / 1e6:.0f} MB in {r['files']} files) "
            f"against writing the same bytes to the same disk, {r['rounds']} interleaved rounds in one process "
            f"on {r['cores']} CPU cores; medians, min..max of the per-round ratio in brackets.",
            "",
            "| export (s) | bound: same bytes written (s) | export / bound | export CPU (s) | bound CPU (s) | goal |",
            "|---|---|---|---|---|---|",
            f"| {r['export_s']:.2f} | {r['bound_s']:.2f} | **{r['ratio']:.2f}x** [{lo:.2f} .. {hi:.2f}] | "
            f"{r['export_cpu_s']:.2f} | {r['bound_cpu_s']:.2f} | <= {r['goal']}x |",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--workdir", default=None, help="where to write (default: a temp folder, removed)")
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/results/export.*")
    args = parser.parse_args()
    result = run(args)
    text = render(result)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "export.md").write_text(text)
        (RESULTS / "export.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
