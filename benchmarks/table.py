"""One table of every performance figure beside its goal and its peer or bound, from benchmarks/results/*.json.

Each row is a ratio (pmakit over the bound, the peer over pmakit, or a fraction of a bound), its goal,
whether the goal is met, and where the figure comes from. Figures that exist only as text from an
earlier run (``recorded.json``) are marked so; GPU rows say "not measured" until a GPU run wrote
its JSON (``gpu_out/`` of ``benchmarks/gpu_checks.sh perf``, copied into ``benchmarks/results/``).

    python -m benchmarks.table            # print, and write benchmarks/results/summary.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


RESULTS = Path(__file__).resolve().parent / "results"
Row = tuple[str, str, str, str, str, str]  # figure, measured, goal, peer or bound, met?, source


def load(name: str, folder: Path) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def _met(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "**no**")


def merge_rows(merge: dict | None, recorded: dict) -> list[Row]:
    if merge is None:
        return [("offline merge / bound", "not measured", "<= 1.3x", "read + write once", "-", "-")]
    rows: list[Row] = []
    src = "merge.json"
    for kind in ("warm", "cold"):
        for r in merge["rows"]:
            if f"bound_{kind}" not in r:
                continue
            wall = r[f"pmakit_{kind}"]["seconds"] / r[f"bound_{kind}"]["seconds"]
            cpu = r[f"pmakit_{kind}"]["cpu"] / r[f"bound_{kind}"]["cpu"]
            rows.append(
                (
                    f"offline merge N={r['n']}, {kind}: pmakit / bound",
                    f"{wall:.2f}x wall ({cpu:.2f}x CPU)",
                    "<= 1.3x" if kind == "warm" else "(reported)",
                    f"bound {r[f'bound_{kind}']['seconds']:.2f} s: inputs read once, output written once",
                    _met(wall <= 1.3) if kind == "warm" else "-",
                    src,
                )
            )
    rss = [r["pmakit_warm"]["peak"] / 2**20 for r in merge["rows"]]
    rows.append(
        (
            f"merge peak RSS, N={merge['rows'][-1]['n']} / N={merge['rows'][0]['n']}",
            f"{rss[-1] / rss[0]:.2f}x ({rss[0]:.0f} -> {rss[-1]:.0f} MiB)",
            "flat in N (<= 1.1x)",
            "-",
            _met(rss[-1] / rss[0] <= 1.1),
            src,
        )
    )
    imports = merge.get("imports")
    if imports:
        rows.append(
            (
                "merge path start-up (interpreter + imports)",
                f"{imports['seconds']:.2f} s wall, {imports['cpu']:.2f} s CPU",
                "small",
                "-",
                "-",
                src,
            )
        )
    rows += mergekit_rows(merge, recorded)
    return rows


def mergekit_rows(merge: dict, recorded: dict) -> list[Row]:
    rows: list[Row] = []
    live = {r["n"]: r for r in merge["rows"] if "mergekit_warm" in r}
    for peer in recorded.get("mergekit", {}).get("rows", []):
        n = peer["n"]
        if n in live:
            r = live[n]
            speed = r["mergekit_warm"]["seconds"] / r["pmakit_warm"]["seconds"]
            cpu = r["mergekit_warm"]["cpu"] / r["pmakit_warm"]["cpu"]
            source = "merge.json"
        else:  # mergekit not installed in this run: its recorded figures against pmakit of the same run
            speed = peer["seconds"] / peer["pmakit_seconds"]
            ours = next((r["pmakit_warm"]["cpu"] for r in merge["rows"] if r["n"] == n), peer["pmakit_cpu"])
            cpu = peer["cpu"] / ours
            source = "recorded.json (mergekit and pmakit wall, one earlier run) + merge.json (pmakit CPU)"
        rows.append(
            (
                f"offline merge N={n}: mergekit / pmakit",
                f"{speed:.1f}x wall ({cpu:.1f}x CPU)",
                ">= 10x",
                "mergekit linear, fp32 accumulation",
                _met(min(speed, cpu) >= 10),
                source,
            )
        )
    return rows


def update_rows(gpu: dict | None, recorded: dict) -> list[Row]:
    if gpu is not None:
        return [
            (
                f"online PMA sample, {r['dtype']} params ({r.get('fold_kernel', '')})",
                f"{r['pct_of_bound']:.0f}% of bound",
                ">= 90%",
                f"HBM bound {r['bound_ms']:.2f} ms ({gpu['env']['device']})",
                _met(r["pct_of_bound"] >= 90),
                "update_gpu.json",
            )
            for r in gpu["results"]
        ]
    old = recorded.get("update_gpu", {})
    return [
        (
            f"online PMA sample, {dtype} params",
            f"{pct}% of bound (before the fused kernel)",
            ">= 90%",
            "HBM bound (H200)",
            _met(pct >= 90),
            "recorded.json: " + old.get("source", ""),
        )
        for dtype, pct in old.get("pct_of_bound", {}).items()
    ]


def overhead_rows(folder: Path) -> list[Row]:
    rows: list[Row] = []
    found = False
    for name in ("overhead_gpu_fp32.json", "overhead_gpu_bf16.json", "overhead_cpu.json"):
        result = load(name, folder)
        if result is None or (found and name == "overhead_cpu.json"):
            continue
        found = found or name != "overhead_cpu.json"
        where = "CPU only" if name == "overhead_cpu.json" else result["device"]
        for key, value in result.items():
            if not (key.endswith("_overhead") and key.startswith("pma@")):
                continue
            variant = key[: -len("_overhead")]
            lo, hi = result[f"{variant}_overhead_range"]
            at_100 = variant.split("@")[1].split("+")[0] == "100"
            in_situ = result.get(f"{variant}_in_situ")
            rows.append(
                (
                    f"step overhead, {variant} ({result.get('dtype', '')}; {where})",
                    f"{value:+.2%} [{lo:+.2%} .. {hi:+.2%}]"
                    + ("" if in_situ is None else f"; in the PMA hook {in_situ:.3%}"),
                    "< 0.1% (GPU)" if at_100 else "(reported)",
                    f"plain Trainer step {result['plain_step_s'] * 1e3:.1f} ms",
                    _met(value < 0.001) if at_100 and where != "CPU only" else "-",
                    name,
                )
            )
    return rows


def export_rows(export: dict | None) -> list[Row]:
    if export is None:
        return [("export pma-<step> / bound", "not measured", "<= 1.25x", "same bytes written", "-", "-")]
    lo, hi = export["ratio_range"]
    return [
        (
            f"export pma-<step>, {export['params'] / 1e6:.0f}M params {export['dtype']}: export / bound",
            f"{export['ratio']:.2f}x [{lo:.2f} .. {hi:.2f}]"
            + (f" ({export['export_cpu_s'] / export['bound_cpu_s']:.2f}x CPU)" if "export_cpu_s" in export else ""),
            f"<= {export['goal']}x",
            f"same {export['bytes'] / 1e6:.0f} MB written: {export['bound_s']:.2f} s",
            _met(export["ratio"] <= export["goal"]),
            "export.json",
        )
    ]


def startup_rows(startup: dict | None) -> list[Row]:
    """`pmakit --version` and `pmakit average --help`: what every command pays before any work."""
    if startup is None:
        return [("start-up, pmakit --version", "not measured", "<= 0.25 s", "-", "-", "-")]
    env, goal = startup["env"], startup["goal_seconds"]
    where = f"{env['cores']} cores, load {env['load_average']:.1f}; ml_dtypes {env['ml_dtypes']}"
    return [
        (
            f"start-up, {r['command']} (median of {r['runs']})",
            f"{r['seconds']:.3f} s wall ({r['cpu']:.3f} s CPU)",
            f"<= {goal} s",
            where,
            _met(r["seconds"] <= goal),
            "startup.json",
        )
        for r in startup["rows"]
    ]


def build_table(folder: Path) -> str:
    recorded = load("recorded.json", folder) or {}
    rows = [
        *merge_rows(load("merge.json", folder), recorded),
        *update_rows(load("update_gpu.json", folder), recorded),
        *overhead_rows(folder),
        *export_rows(load("export.json", folder)),
        *startup_rows(load("startup.json", folder)),
    ]
    lines = [
        "# Performance summary",
        "",
        "Written by `python -m benchmarks.table` (`make bench`) from `benchmarks/results/*.json`. "
        "Ratios below 1 beat the bound. Rows marked CPU only were not measured on a GPU.",
        "",
        "| figure | measured | goal | peer or bound | met | source |",
        "|---|---|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    table = build_table(args.results)
    print(table)
    if not args.no_write:
        (args.results / "summary.md").write_text(table)


if __name__ == "__main__":
    main()
