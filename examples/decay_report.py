"""The report of `decay_merge.py`: losses and shares of a decay's gain as mean ± std over seeds, the winners, a plot.

Every function takes ``runs``: one record per seed (``live``, ``decays`` keyed ``SHAPE@L``, ``merges`` keyed
``RULE@L``). With one seed the tables print plain numbers, with more the mean ± the sample standard
deviation over seeds (n - 1).
"""

from __future__ import annotations

import math
from pathlib import Path

from examples.common import mean_std, save_figure


DUAL = {"sma": "linear", "decay:cosine": "cosine", "decay:1-sqrt": "1-sqrt"}
COLORS = {"linear": "tab:blue", "cosine": "tab:orange", "1-sqrt": "tab:green"}
# each merge in its dual decay's colour; the rules without a dual decay in colours of their own
COLORS |= {"sma": "tab:blue", "decay:cosine": "tab:orange", "decay:1-sqrt": "tab:green", "ema": "tab:red"}
COLORS |= {"ema_corrected": "tab:purple", "wma": "tab:brown", "bema": "tab:pink", "ema_halflife:0.05": "tab:olive"}


def share(live: float, merged: float, decayed: float) -> float | None:
    """(live - merged) / (live - decayed): the share of the decay's gain that the merge recovers."""
    gain = live - decayed
    return (live - merged) / gain if gain > 0 else None


def shares(runs: list[dict], rule: str, window: int, shape: str, kind: str = "merges") -> list[float | None]:
    """The share of the ``shape`` decay's gain that ``rule`` (a merge, or a decay of ``kind="decays"``) recovers
    over ``window`` steps, per seed."""
    return [share(r["live"], r[kind][f"{rule}@{window}"], r["decays"][f"{shape}@{window}"]) for r in runs]


def cell(values: list[float | None], fmt: str = "{:.4f}") -> str:
    """One value, or mean ± std of several; ``n/a`` where any is missing (a decay that did not gain)."""
    if any(v is None for v in values):
        return "n/a"
    if len(values) == 1:
        return fmt.format(values[0])
    mean, std = mean_std(values)
    return f"{fmt.format(mean)} ± {fmt.replace('+', '').format(std)}"


def loss_table(runs: list[dict], windows: list[int], interleave: int, shapes, rules) -> str:
    """Validation loss of the live weights, each decay and each merge, per window."""
    head = "| window (steps / samples) | " + " | ".join(f"{w} / {w // interleave}" for w in windows) + " |"
    lines = [head, "|---|" + "---|" * len(windows)]
    live = cell([r["live"] for r in runs])
    lines.append("| live, constant LR (step T) | " + " | ".join(live for _ in windows) + " |")
    for kind, names in (("decay", shapes), ("merge", rules)):
        for name in names:
            cells = [cell([r[f"{kind}s"][f"{name}@{w}"] for r in runs]) for w in windows]
            lines.append(f"| {kind} {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def share_table(runs: list[dict], windows: list[int], shapes, rules) -> str:
    """Each merge's share of each decay's gain per window; bold where the merge is the decay's WSM dual."""
    lines = ["| window | merge | " + " | ".join(f"share of {s} decay" for s in shapes) + " |"]
    lines.append("|---|---|" + "---|" * len(shapes))
    for w in windows:
        for rule in rules:
            cells = [cell(shares(runs, rule, w, s), "{:.0%}") for s in shapes]
            cells = [f"**{c}**" if DUAL.get(rule) == s else c for c, s in zip(cells, shapes, strict=True)]
            lines.append(f"| {w} | {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def share_matrix(runs: list[dict], windows: list[int], shape: str, rules) -> str:
    """Each merge's share of the ``shape`` decay's gain, one row per merge and one column per window."""
    lines = ["| merge | " + " | ".join(f"{w} steps" for w in windows) + " |", "|---|" + "---|" * len(windows)]
    for rule in rules:
        lines.append(f"| {rule} | " + " | ".join(cell(shares(runs, rule, w, shape), "{:.0%}") for w in windows) + " |")
    return "\n".join(lines)


def gap_table(runs: list[dict], windows: list[int], shapes, rules) -> str:
    """Each merge's and decay's loss minus the best merge's at that window: per seed (paired), then mean ± std."""
    best = {w: ("merges", f"{_by_mean(runs, 'merges', rules, w)[0]}@{w}") for w in windows}
    lines = ["| model | " + " | ".join(f"{w} steps" for w in windows) + " |", "|---|" + "---|" * len(windows)]
    for kind, names in (("merges", rules), ("decays", shapes)):
        for name in names:
            cells = [cell(_gaps(runs, best[w], (kind, f"{name}@{w}")), "{:+.4f}") for w in windows]
            lines.append(f"| {kind[:-1]} {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tables(runs: list[dict], windows: list[int], interleave: int, shapes, rules) -> str:
    """The losses, then each merge's share of each decay's gain."""
    return loss_table(runs, windows, interleave, shapes, rules) + "\n\n" + share_table(runs, windows, shapes, rules)


def _by_mean(runs: list[dict], kind: str, names, window: int) -> list[str]:
    return sorted(names, key=lambda n: mean_std([r[kind][f"{n}@{window}"] for r in runs])[0])


def _gaps(runs: list[dict], a: tuple[str, str], b: tuple[str, str]) -> list[float]:
    """Per seed, loss of ``b`` minus loss of ``a`` ((kind, key) pairs): paired, so the seeds' shared noise cancels."""
    return [r[b[0]][b[1]] - r[a[0]][a[1]] for r in runs]


def winners(runs: list[dict], windows: list[int], shapes, rules) -> dict:
    """Per window: the best merge by mean loss, in how many seeds it is best, its lead, its gap to the best decay."""
    found = {}
    for w in windows:
        ranked = _by_mean(runs, "merges", rules, w)
        best = ("merges", f"{ranked[0]}@{w}")
        per_seed = [min(rules, key=lambda n, r=r: r["merges"][f"{n}@{w}"]) for r in runs]
        entry = {"best": ranked[0], "best_in_seeds": per_seed.count(ranked[0]), "per_seed_best": per_seed}
        if len(ranked) > 1:
            entry |= {"runner_up": ranked[1], "lead": _gaps(runs, best, ("merges", f"{ranked[1]}@{w}"))}
        if shapes:
            decay = _by_mean(runs, "decays", shapes, w)[0]
            entry |= {"best_decay": decay, "merge_minus_decay": _gaps(runs, ("decays", f"{decay}@{w}"), best)}
        found[w] = entry
    return found


def winners_table(runs: list[dict], found: dict) -> str:
    """The `winners` as a table: differences per seed (paired), mean ± std."""
    lines = [
        "| window | best merge | best in seeds | runner-up | runner-up − best | best decay "
        "| best merge − best decay |",
        "|---|---|---|---|---|---|---|",
    ]
    for w, e in found.items():
        lead = cell(e["lead"], "{:+.4f}") if "lead" in e else ""
        gap = cell(e["merge_minus_decay"], "{:+.4f}") if "best_decay" in e else ""
        row = [str(w), e["best"], f"{e['best_in_seeds']} of {len(runs)}", e.get("runner_up", ""), lead]
        lines.append("| " + " | ".join([*row, e.get("best_decay", ""), gap]) + " |")
    return "\n".join(lines)


def aggregate(runs: dict[int, dict], windows: list[int], shapes, rules) -> dict:
    """The summary: mean and std over seeds of every loss and share, the winners, and every seed's raw record."""
    records = list(runs.values())

    def stats(kind: str) -> tuple[dict, dict]:
        keys = [k for k in records[0][kind] if all(k in r[kind] for r in records)]
        pairs = {k: mean_std([r[kind][k] for r in records]) for k in keys}
        return {k: m for k, (m, _) in pairs.items()}, {k: s for k, (_, s) in pairs.items()}

    (decays, decays_std), (merges, merges_std) = stats("decays"), stats("merges")
    live, live_std = mean_std([r["live"] for r in records])
    share_stats = {
        s: {f"{rule}@{w}": _share_stats(shares(records, rule, w, s)) for rule in rules for w in windows}
        for s in shapes
    }
    return {
        "seeds": list(runs),
        "live": live,
        "decays": decays,
        "merges": merges,
        "std": {"live": live_std, "decays": decays_std, "merges": merges_std},
        "shares": share_stats,
        "winners": {str(w): e for w, e in winners(records, windows, shapes, rules).items()},
        "per_seed": {str(seed): record for seed, record in runs.items()},
    }


def _share_stats(values: list[float | None]) -> dict:
    if any(v is None for v in values):
        return {"mean": None, "std": None, "per_seed": values}
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "per_seed": values}


def _share_points(runs: list[dict], kind: str, name: str, windows: list[int], shape: str) -> tuple[list, list]:
    """Mean and std over seeds of the share of the ``shape`` decay's gain per window (NaN where none)."""
    points = [shares(runs, name, w, shape, kind) for w in windows]
    stats = [mean_std(p) if None not in p else (math.nan, math.nan) for p in points]
    return [m for m, _ in stats], [s for _, s in stats]


def write_plot(path: Path, runs: list[dict], windows: list[int], title: str, shapes, rules) -> None:
    """Left: mean loss against window, decays dashed, merges solid. Right: the share of the first decay shape's
    gain, paired per seed, mean ± std: the seeds' common offset cancels there, not in the left panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    fig, (loss_ax, share_ax) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    loss_ax.axhline(mean_std([r["live"] for r in runs])[0], color="black", lw=1, label="live, constant LR")
    for kind, names, style in (("decays", shapes, "s--"), ("merges", rules, "o-")):
        for name in names:
            color, label = COLORS.get(name), f"{kind[:-1]} {name}"
            loss_ax.plot(
                windows,
                [mean_std([r[kind][f"{name}@{w}"] for r in runs])[0] for w in windows],
                style,
                color=color,
                label=label,
            )
            mean, std = _share_points(runs, kind, name, windows, shapes[0])
            share_ax.errorbar(windows, mean, yerr=std, fmt=style, capsize=3, color=color)
    loss_ax.set_ylabel("validation loss (nats/byte), mean over seeds")
    share_ax.set_ylabel(f"share of the {shapes[0]} decay's gain, mean ± std")
    share_ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    for ax in (loss_ax, share_ax):
        ax.set_xlabel("window L (steps): decay length = merge span")
        ax.set_xscale("log", base=2)
        ax.set_xticks(windows, [str(w) for w in windows])
        ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{title}; {len(runs)} seed{'s' if len(runs) > 1 else ''}", fontsize=9)
    save_figure(fig, path)
