"""Offline merge benchmark: pmakit vs mergekit `linear` vs reading every input once.

Builds N checkpoints of a ~110M-parameter Llama (bf16, 100 MB shards, tied embeddings) for
N = 2, 8, 16 and times, in child processes (peak RSS is the child's ``ru_maxrss``):

* ``read-once``: every input file read once into one reused 16 MiB buffer (the I/O bound);
* ``pmakit``: ``pmakit average ... --algo sma`` (fp32 accumulation, bf16 output);
* ``mergekit``: ``mergekit-yaml`` with ``merge_method: linear``, equal weights, ``dtype: float32``
  (the same fp32 arithmetic), ``out_dtype: bfloat16``.

"warm" runs follow a read of the inputs (page cache hot); "cold" runs follow
``posix_fadvise(DONTNEED)`` on every input (the kernel drops those cached pages; no root needed).
mergekit runs from its own virtual environment when ``--mergekit`` points at one (its pins may
conflict with transformers 5), else from this one.

    python benchmarks/merge.py [--sizes 2 8 16] [--mergekit .venv-mergekit/bin/mergekit-yaml] [--cold]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "merge.md"

CHILD = r"""
import resource, subprocess, sys, time, json
start = time.perf_counter()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
seconds = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": proc.returncode, "seconds": seconds, "peak": usage.ru_maxrss * 1024,
                  "cpu": usage.ru_utime + usage.ru_stime, "err": proc.stderr[-2000:]}))
"""

READ_ONCE = r"""
import os, sys
buf = bytearray(16 << 20)
view = memoryview(buf)
total = 0
for path in sys.argv[1:]:
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(view)
            if not n:
                break
            total += n
print(total)
"""


def measure(cmd: list[str]) -> dict:
    """Run ``cmd`` under a small parent that reports its wall time and peak RSS."""
    out = subprocess.run([sys.executable, "-c", CHILD, *cmd], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{cmd[0]} failed ({result['rc']}): {result['err']}")
    return result


def drop_cache(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def build_checkpoints(root: Path, n: int) -> list[Path]:
    """``n`` checkpoint folders of one ~110M-parameter Llama with different (random) weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32000,
        tie_word_embeddings=True,
        dtype="bfloat16",
    )
    folders = []
    model = None
    for i in range(n):
        folder = root / f"checkpoint-{(i + 1) * 1000}"
        folders.append(folder)
        if (folder / "config.json").is_file():
            continue
        if model is None:
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        model.save_pretrained(folder, max_shard_size="100MB")
    return folders


def input_files(folders: list[Path]) -> list[Path]:
    return [f for d in folders for f in sorted(d.glob("*.safetensors"))]


def mergekit_config(folders: list[Path], path: Path) -> None:
    import yaml

    config = {
        "merge_method": "linear",
        "models": [{"model": str(f), "parameters": {"weight": 1.0}} for f in folders],
        "parameters": {"normalize": True},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    path.write_text(yaml.safe_dump(config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 8, 16])
    parser.add_argument(
        "--workdir", default=None, help="where checkpoints are built (default: a temp folder, removed)"
    )
    parser.add_argument(
        "--mergekit", default=shutil.which("mergekit-yaml") or str(ROOT / ".venv-mergekit/bin/mergekit-yaml")
    )
    parser.add_argument(
        "--cold", action="store_true", help="also time read-once and pmakit with the inputs dropped from cache"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/results/merge.md")
    args = parser.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="pmakit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    have_mergekit = Path(args.mergekit).is_file()
    pmakit_cmd = [sys.executable, "-m", "pmakit.cli", "average"]
    rows = []
    try:
        all_folders = build_checkpoints(work / "run", max(args.sizes))
        params = None
        for n in args.sizes:
            folders = all_folders[-n:]
            files = input_files(folders)
            total = sum(f.stat().st_size for f in files)
            row = {"n": n, "bytes": total}
            out = work / f"out-{n}"
            threads = ["--threads", str(args.threads)] if args.threads else []
            pm = [*pmakit_cmd, *map(str, folders), "-o", str(out), "--overwrite", "--no-progress", *threads]
            if args.cold:
                drop_cache(files)
                row["read_cold"] = measure([sys.executable, "-c", READ_ONCE, *map(str, files)])
                drop_cache(files)
                row["pmakit_cold"] = measure(pm)
            measure([sys.executable, "-c", READ_ONCE, *map(str, files)])  # warm the cache
            row["read_warm"] = measure([sys.executable, "-c", READ_ONCE, *map(str, files)])
            row["pmakit_warm"] = measure(pm)
            if params is None:
                from pmakit.io.safetensors import SafetensorsFile

                params = sum(t.numel for f in out.glob("*.safetensors") for t in SafetensorsFile(f).tensors.values())
            if have_mergekit:
                cfg = work / f"mergekit-{n}.yml"
                mergekit_config(folders, cfg)
                mk_out = work / f"mk-{n}"
                shutil.rmtree(mk_out, ignore_errors=True)
                measure([sys.executable, "-c", READ_ONCE, *map(str, files)])
                row["mergekit_warm"] = measure(
                    [args.mergekit, str(cfg), str(mk_out), "--no-copy-tokenizer", "--quiet"]
                )
                check_same(out, mk_out)
                shutil.rmtree(mk_out, ignore_errors=True)
            rows.append(row)
            print(
                json.dumps(
                    {
                        k: (v if not isinstance(v, dict) else {"s": round(v["seconds"], 2), "rss_mb": v["peak"] >> 20})
                        for k, v in row.items()
                    }
                ),
                flush=True,
            )
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    table = render(rows, params, have_mergekit, args.cold)
    print(table)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(table)


def check_same(ours: Path, theirs: Path) -> None:
    """Both tools computed the same average (bf16 outputs within one rounding of each other)."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "src"))
    from pmakit.io.safetensors import SafetensorsFile

    def tensors(folder):
        found = {}
        for f in folder.glob("*.safetensors"):
            found.update(SafetensorsFile(f).tensors)
        return found

    a, b = tensors(ours), tensors(theirs)
    name = "model.layers.5.mlp.down_proj.weight"
    x = np.fromfile(a[name].file, dtype=np.uint16, count=a[name].numel, offset=a[name].start)
    y = np.fromfile(b[name].file, dtype=np.uint16, count=b[name].numel, offset=b[name].start)
    fx = (x.astype(np.uint32) << 16).view(np.float32)
    fy = (y.astype(np.uint32) << 16).view(np.float32)
    if not np.allclose(fx, fy, rtol=2**-7, atol=1e-6):
        raise RuntimeError(f"pmakit and mergekit disagree on {name}")


def render(rows: list[dict], params: int | None, have_mergekit: bool, cold: bool) -> str:
    import platform

    mb = lambda r: f"{r['peak'] / 2**20:.0f}"  # noqa: E731
    lines = [
        "# Offline merge benchmark",
        "",
        f"`python benchmarks/merge.py` on {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}; {params / 1e6:.0f}M-parameter Llama checkpoints in bf16, "
        "100 MB shards; SMA of the N newest; fp32 accumulation, bf16 output. Times are wall seconds of a child "
        "process (interpreter start and imports included); CPU is the child's user + system time (all threads), "
        "which other jobs on the machine do not inflate; peak RSS is the child's `ru_maxrss`. "
        "Warm: inputs in the page cache.",
        "",
    ]
    head = (
        "| N | input size | read once (s) | pmakit (s) | pmakit / read | read once CPU (s) | pmakit CPU (s) "
        "| pmakit peak RSS (MiB) |"
    )
    sep = "|---|---|---|---|---|---|---|---|"
    if have_mergekit:
        head += " mergekit linear (s) | mergekit peak RSS (MiB) | speed-up | RSS ratio |"
        sep += "---|---|---|---|"
    lines += [head, sep]
    for r in rows:
        read, ours = r["read_warm"], r["pmakit_warm"]
        line = (
            f"| {r['n']} | {r['bytes'] / 1e9:.2f} GB | {read['seconds']:.2f} | {ours['seconds']:.2f} | "
            f"{ours['seconds'] / read['seconds']:.2f}x | {read['cpu']:.2f} | {ours['cpu']:.2f} | {mb(ours)} |"
        )
        if have_mergekit:
            mk = r["mergekit_warm"]
            line += (
                f" {mk['seconds']:.2f} ({mk['cpu']:.1f} CPU) | {mb(mk)} | {mk['seconds'] / ours['seconds']:.2f}x | "
                f"{ours['peak'] / mk['peak']:.2f} |"
            )
        lines.append(line)
    if cold:
        lines += [
            "",
            "Cold (inputs dropped from the page cache with `posix_fadvise(DONTNEED)` before each run):",
            "",
            "| N | read once (s) | pmakit (s) | pmakit / read | read once CPU (s) | pmakit CPU (s) "
            "| pmakit peak RSS (MiB) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            read, ours = r["read_cold"], r["pmakit_cold"]
            lines.append(
                f"| {r['n']} | {read['seconds']:.2f} | {ours['seconds']:.2f} | "
                f"{ours['seconds'] / read['seconds']:.2f}x | {read['cpu']:.2f} | {ours['cpu']:.2f} | {mb(ours)} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
