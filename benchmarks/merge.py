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

    python -m benchmarks.merge [--sizes 2 8 16] [--mergekit .venv-mergekit/bin/mergekit-yaml] [--cold]
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
PMAKIT = [sys.executable, "-m", "pmakit.cli", "average"]

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


# The I/O bound of a merge: the same interpreter start, the same number of threads, every input byte
# read once (pread into a reused per-thread buffer) and the output's bytes written once, to files of
# the output's sizes in a folder beside it on the same disk. No imports beyond the standard library:
# what pmakit spends above this is its imports, planning and arithmetic.
BOUND = r"""
import os, sys, threading
threads, out_dir, out_sizes, files = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
CHUNK = 8 << 20
work = [("r", f, off, min(CHUNK, os.path.getsize(f) - off)) for f in files
        for off in range(0, os.path.getsize(f), CHUNK)]
os.makedirs(out_dir, exist_ok=True)
outs = [os.path.join(out_dir, f"shard-{i}.bin") for i, _ in enumerate(out_sizes.split(","))]
for path, size in zip(outs, out_sizes.split(","), strict=True):
    with open(path, "wb") as f:
        f.truncate(int(size))
    work += [("w", path, off, min(CHUNK, int(size) - off)) for off in range(0, int(size), CHUNK)]
lock = threading.Lock()
items = iter(work)
def worker():
    buf = memoryview(bytearray(CHUNK))
    fds = {}
    while True:
        with lock:
            item = next(items, None)
        if item is None:
            break
        kind, path, off, size = item
        if path not in fds:
            fds[path] = os.open(path, os.O_RDONLY if kind == "r" else os.O_WRONLY)
        if kind == "r":
            os.preadv(fds[path], [buf[:size]], off)
        else:
            os.pwrite(fds[path], buf[:size], off)
    for fd in fds.values():
        os.close(fd)
pool = [threading.Thread(target=worker) for _ in range(threads)]
for t in pool:
    t.start()
for t in pool:
    t.join()
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
    from transformers import LlamaForCausalLM

    from examples.models import llama_config

    config = llama_config("110m", dtype="bfloat16")
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


def median_run(runs: list[dict]) -> dict:
    """The run of median wall time, with every run's seconds kept for the spread."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    return {**ordered[len(ordered) // 2], "all": [round(r["seconds"], 3) for r in runs]}


def time_pair(bound_cmd, pmakit_cmd, outs: list[Path], files: list[Path], rounds: int, cold: bool) -> tuple:
    """Bound and pmakit in interleaved rounds (so load from other jobs falls on both alike)."""
    bound, ours = [], []
    for _ in range(rounds):
        for cmd, runs in ((bound_cmd, bound), (pmakit_cmd, ours)):
            for out in outs:
                shutil.rmtree(out, ignore_errors=True)
            if cold:
                drop_cache(files)
            else:
                measure([sys.executable, "-c", READ_ONCE, *map(str, files)])
            runs.append(measure(cmd))
    return median_run(bound), median_run(ours)


def import_cost() -> dict:
    """Start-up of the merge path: interpreter plus every module ``pmakit average`` imports for a local merge."""
    code = "import pmakit.cli, pmakit.merging.merger"
    return median_run([measure([sys.executable, "-c", code]) for _ in range(5)])


def bench_size(args, folders: list[Path], work: Path, threads: int) -> dict:
    files = input_files(folders)
    out, bound_out = work / f"out-{len(folders)}", work / f"bound-{len(folders)}"
    out_sizes = ",".join(str(f.stat().st_size) for f in sorted(folders[-1].glob("*.safetensors")))
    row = {"n": len(folders), "bytes": sum(f.stat().st_size for f in files), "threads": threads}
    pm = [*PMAKIT, *map(str, folders), "-o", str(out), "--overwrite", "--no-progress", "--threads", str(threads)]
    bound = [sys.executable, "-c", BOUND, str(threads), str(bound_out), out_sizes, *map(str, files)]
    if args.cold:
        row["bound_cold"], row["pmakit_cold"] = time_pair(bound, pm, [out, bound_out], files, args.rounds, True)
    row["bound_warm"], row["pmakit_warm"] = time_pair(bound, pm, [out, bound_out], files, args.rounds, False)
    shutil.rmtree(bound_out, ignore_errors=True)
    if Path(args.mergekit).is_file():
        cfg, mk_out = work / f"mergekit-{len(folders)}.yml", work / f"mk-{len(folders)}"
        mergekit_config(folders, cfg)
        shutil.rmtree(mk_out, ignore_errors=True)
        measure([sys.executable, "-c", READ_ONCE, *map(str, files)])
        row["mergekit_warm"] = measure([args.mergekit, str(cfg), str(mk_out), "--no-copy-tokenizer", "--quiet"])
        check_same(out, mk_out)
        shutil.rmtree(mk_out, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 8, 16])
    parser.add_argument(
        "--workdir", default=None, help="where checkpoints are built (default: a temp folder, removed)"
    )
    parser.add_argument(
        "--mergekit", default=shutil.which("mergekit-yaml") or str(ROOT / ".venv-mergekit/bin/mergekit-yaml")
    )
    parser.add_argument("--no-cold", dest="cold", action="store_false", help="skip the runs from a cold page cache")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of bound and pmakit (median)")
    parser.add_argument("--threads", type=int, default=None, help="threads of pmakit and of the bound alike")
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/results/merge.*")
    args = parser.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="pmakit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    from pmakit.merging.stream import default_threads

    threads = args.threads or default_threads()
    rows = []
    try:
        all_folders = build_checkpoints(work / "run", max(args.sizes))
        for n in args.sizes:
            rows.append(bench_size(args, all_folders[-n:], work, threads))
            print(json.dumps({k: v.get("seconds", v) if isinstance(v, dict) else v for k, v in rows[-1].items()}))
        params = count_params(work / f"out-{args.sizes[-1]}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "rows": rows,
        "params": params,
        "imports": import_cost(),
        "cores": os.cpu_count(),
    }
    table = render(result)
    print(table)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(table)
        RESULTS.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")


def count_params(folder: Path) -> int:
    from pmakit.io.safetensors import SafetensorsFile

    return sum(t.numel for f in folder.glob("*.safetensors") for t in SafetensorsFile(f).tensors.values())


def check_same(ours: Path, theirs: Path) -> None:
    """Both tools computed the same average (bf16 outputs within one rounding of each other)."""
    import numpy as np

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


def _ratio_line(r: dict, kind: str, with_mergekit: bool) -> str:
    bound, ours = r[f"bound_{kind}"], r[f"pmakit_{kind}"]
    line = (
        f"| {r['n']} | {r['bytes'] / 1e9:.2f} GB | {bound['seconds']:.2f} | {ours['seconds']:.2f} | "
        f"**{ours['seconds'] / bound['seconds']:.2f}x** | {bound['cpu']:.2f} | {ours['cpu']:.2f} | "
        f"{ours['cpu'] / bound['cpu']:.2f}x | {ours['peak'] / 2**20:.0f} |"
    )
    if with_mergekit:
        mk = r.get("mergekit_warm")
        line += (
            f" {mk['seconds']:.2f} | {mk['peak'] / 2**20:.0f} | {mk['seconds'] / ours['seconds']:.1f}x |"
            if mk
            else " - | - | - |"
        )
    return line


def render(result: dict) -> str:
    import platform

    rows = result["rows"]
    with_mk = any("mergekit_warm" in r for r in rows)
    imports = result["imports"]
    lines = [
        "# Offline merge benchmark",
        "",
        f"`python -m benchmarks.merge` on {result['cores']} CPU cores ({platform.machine()}), Python "
        f"{platform.python_version()}; {result['params'] / 1e6:.0f}M-parameter Llama checkpoints in bf16, 100 MB "
        f"shards; SMA of the N newest; fp32 accumulation, bf16 output; {rows[0]['threads']} threads. Times are "
        "wall seconds of a child process, interpreter start and imports included (median of interleaved rounds); "
        "CPU is its user + system time over all threads, which other jobs on the machine do not inflate; "
        "peak RSS is its `ru_maxrss`.",
        "",
        "**Bound**: the same I/O in a bare interpreter with the same threads: every input byte read once "
        "and the output's bytes written once to the same disk. The merge path's imports cost "
        f"{imports['seconds']:.2f} s wall / {imports['cpu']:.2f} s CPU (interpreter start included).",
        "",
    ]
    for kind in ("warm", "cold"):
        if f"bound_{kind}" not in rows[0]:
            continue
        title = "Warm (inputs in the page cache)" if kind == "warm" else "Cold (inputs dropped from the page cache)"
        head = (
            "| N | inputs | bound (s) | pmakit (s) | pmakit / bound | bound CPU (s) | pmakit CPU (s) "
            "| CPU ratio | peak RSS (MiB) |"
        )
        sep = "|---|---|---|---|---|---|---|---|---|"
        mk = with_mk and kind == "warm"
        if mk:
            head += " mergekit (s) | mergekit RSS (MiB) | speed-up |"
            sep += "---|---|---|"
        lines += [f"{title}:", "", head, sep, *(_ratio_line(r, kind, mk) for r in rows), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
