"""The full-length tables of issue #25, from the committed ``metrics.json`` files alone.

    python -m tools.evidence p2      # docs/results/p2_full -> report.md, accuracy.png
    python -m tools.evidence p5      # docs/results/p5      -> report.md, heatmaps.png
    python -m tools.evidence p5 --add-seed-runs   # + seeds 43, 44 where the protocol asks

**P2** (runs ``<arm>`` for seed 42, ``<arm>-seed43``, ``<arm>-seed44``): per arm the final
round, the mean of the last 5 rounds and the best round (labelled with its round), each as
mean ± std over the seeds that finished (sample std; a single seed says so), the
personalized accuracy of every client in the final round (mean over seeds), and one plot of
the personalized accuracy per round: the seeds' mean and their min-max band.

**P5** (runs ``a<alpha>-n<n>-<method>[-seed<s>]``): per cell (Dirichlet alpha x train
examples per client) each method's final personalized accuracy (mean ± std where several
seeds finished), and two heatmaps: FML minus the best of the other methods (personalized),
and FML's global model minus FedAvg's (central test set). The protocol adds seeds 43 and 44
wherever FML and the best other method are within 1 point, or the sign of their difference
changes between neighbouring cells (next alpha or next n); the report names those cells and
``--add-seed-runs`` appends their missing runs to ``conf/sweeps/p5.yaml``.

Every run also names the commit, machine, precision and memory format it ran with.
Nothing is computed that a ``metrics.json`` does not hold; a run without ``finished`` is
left out and listed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
P2_ARMS = ("fml", "fml-pfllib", "local", "fedavg", "fedprox", "ditto", "fedper", "fedrep")
P5_METHODS = ("fml", "local", "ditto", "fedavg")
SEED = re.compile(r"^(?P<arm>.+?)(?:-seed(?P<seed>\d+))?$")
CELL = re.compile(r"^a(?P<alpha>[\d.]+)-n(?P<n>\d+)-(?P<method>[a-z]+)(?:-seed(?P<seed>\d+))?$")


def load_run(folder: Path) -> dict[str, Any] | None:
    """A finished run's record and configuration, or None (unfinished or absent)."""
    try:
        record = json.loads((folder / "metrics.json").read_text())
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not record["run"].get("finished"):
        return None
    rounds = [r for r in record["rounds"] if r["round"] > 0]
    if len(rounds) < cfg["federation"]["num_rounds"]:
        return None
    return {"run": record["run"], "rounds": rounds, "config": cfg}


def _shown(folder: Path) -> str:
    """``folder`` as the report names it: relative to the repository when inside it."""
    return str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else folder.name


def mean_std(values: list[float]) -> str:
    """``mean ± std`` in %, or ``value (1 seed)``."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.2f} (1 seed)"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def personal(rounds: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """``(round, personalized accuracy)`` of the rounds the clients scored."""
    return [(r["round"], r["personal_acc"]) for r in rounds if r.get("personal_acc") is not None]


def run_facts(run: dict[str, Any]) -> str:
    """The commit, machine, precision and memory format of a run (for the tables)."""
    info, t = run["run"], run["config"]["train"]
    commit = (info.get("commit") or "?")[:7]
    return (
        f"commit {commit}, {t.get('precision', 'fp32')}, {t.get('memory_format', 'auto')}, "
        f"{info.get('machine', '?')}"
    )


# ------------------------------------------------------------------------------- P2


def p2_report(folder: Path) -> Path:
    """``report.md`` and ``accuracy.png`` of the P2 sweep in ``folder``."""
    runs: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    unfinished = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = SEED.match(sub.name)
        run = load_run(sub)
        if match is None or run is None:
            unfinished.append(sub.name)
            continue
        runs[match["arm"]][int(match["seed"] or 42)] = run
    lines = [
        "# P2 at full length: CIFAR-10, Dirichlet 0.5, 10 clients, `cnn-unpadded`, R = 30",
        "",
        f"Written by `python -m tools.evidence p2` from `{_shown(folder)}`. "
        "Personalized accuracy (%), each client's model on its own test part, mean weighted "
        "by test examples; mean ± std (sample) over the training seeds that finished.",
        "",
        "| method | seeds | final (R = 30) | mean of the last 5 rounds | best round (round) "
        "| global, central (final) |",
        "|---|---|---|---|---|---|",
    ]
    order = [a for a in P2_ARMS if a in runs] + sorted(a for a in runs if a not in P2_ARMS)
    for arm in order:
        seeds = runs[arm]
        finals, last5, bests, best_rounds, central = [], [], [], [], []
        for run in seeds.values():
            series = personal(run["rounds"])
            finals.append(series[-1][1])
            last5.append(statistics.mean(v for _, v in series[-5:]))
            best_round, best = max(series, key=lambda rv: rv[1])
            bests.append(best)
            best_rounds.append(best_round)
            if run["rounds"][-1].get("central_acc") is not None:
                central.append(run["rounds"][-1]["central_acc"])
        lines.append(
            f"| {arm} | {', '.join(str(s) for s in sorted(seeds))} | {mean_std(finals)} "
            f"| {mean_std(last5)} | {mean_std(bests)} (best; round{'s' * (len(seeds) > 1)} "
            f"{', '.join(str(r) for r in best_rounds)}) | {mean_std(central)} |"
        )
    lines += ["", "## Every client's final personalized accuracy (%, mean over seeds)", ""]
    clients = sorted(
        {int(c) for s in runs.values() for r in s.values() for c in r["rounds"][-1]["clients"]}
    )
    lines.append("| method | " + " | ".join(f"client {c}" for c in clients) + " |")
    lines.append("|---|" + "---|" * len(clients))
    for arm in order:
        cells = []
        for c in clients:
            values = [
                r["rounds"][-1]["clients"][str(c)]["personal_acc"]
                for r in runs[arm].values()
                if "personal_acc" in r["rounds"][-1]["clients"].get(str(c), {})
            ]
            cells.append(f"{100 * statistics.mean(values):.1f}" if values else "-")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "## The runs", ""]
    for arm in order:
        for seed, run in sorted(runs[arm].items()):
            lines.append(f"- `{arm}` seed {seed}: {run_facts(run)}")
    if unfinished:
        lines += ["", f"Not finished (left out): {', '.join(unfinished)}."]
    report = folder / "report.md"
    report.write_text("\n".join(lines) + "\n")
    _p2_plot(folder, runs, order)
    return report


def _p2_plot(folder: Path, runs: dict[str, dict[int, dict[str, Any]]], order: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for arm in order:
        per_seed = [dict(personal(run["rounds"])) for run in runs[arm].values()]
        xs = sorted(set.intersection(*(set(s) for s in per_seed)))
        if not xs:
            continue
        mean = [statistics.mean(s[x] for s in per_seed) for x in xs]
        low = [min(s[x] for s in per_seed) for x in xs]
        high = [max(s[x] for s in per_seed) for x in xs]
        seeds = f"{len(per_seed)} seed{'s' * (len(per_seed) > 1)}"
        (line,) = ax.plot(xs, mean, label=f"{arm} ({seeds})")
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel("personalized accuracy (own test)")
    ax.set_title("P2: CIFAR-10 Dirichlet 0.5, cnn-unpadded (band: min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "accuracy.png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------- P5


def p5_cells(folder: Path) -> tuple[dict[tuple[float, int, str], list[dict]], list[str]]:
    """``(alpha, n, method) -> [final round of every finished seed]`` and the unfinished."""
    cells: dict[tuple[float, int, str], list[dict]] = defaultdict(list)
    unfinished = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = CELL.match(sub.name)
        run = load_run(sub)
        if match is None or run is None:
            unfinished.append(sub.name)
            continue
        key = (float(match["alpha"]), int(match["n"]), match["method"])
        cells[key].append(run["rounds"][-1])
    return cells, unfinished


def fml_minus_best(
    cells: dict[tuple[float, int, str], list[dict]], alpha: float, n: int
) -> float | None:
    """FML's mean final personalized accuracy minus the best other method's, in cell
    ``(alpha, n)``; ``None`` until every method has a finished run there.
    """
    means = {
        m: statistics.mean(r["personal_acc"] for r in cells[(alpha, n, m)])
        for m in P5_METHODS
        if cells.get((alpha, n, m))
    }
    if len(means) < len(P5_METHODS):
        return None
    return means["fml"] - max(v for m, v in means.items() if m != "fml")


def p5_differences(
    cells: dict[tuple[float, int, str], list[dict]],
) -> dict[tuple[float, int], float]:
    """``fml_minus_best`` of every cell (of :func:`p5_cells`) that has all methods."""
    out = {}
    for alpha, n in {(a, n) for a, n, _ in cells}:
        gap = fml_minus_best(cells, alpha, n)
        if gap is not None:
            out[(alpha, n)] = gap
    return out


def p5_report(folder: Path) -> Path:
    """``report.md`` and ``heatmaps.png`` of the P5 sweep in ``folder``."""
    cells, unfinished = p5_cells(folder)
    alphas = sorted({a for a, _, _ in cells})
    sizes = sorted({n for _, n, _ in cells})
    lines = [
        "# P5: where FML pays (CIFAR-10, 10 clients, Dirichlet alpha x train examples n)",
        "",
        f"Written by `python -m tools.evidence p5` from `{_shown(folder)}`. Final "
        "(R = 30) personalized accuracy (%), mean weighted by test examples; mean ± std over "
        "seeds where several finished. `cnn-unpadded`, batch 32, E = 1, fp32.",
        "",
    ]
    diff = p5_differences(cells)
    central: dict[tuple[float, int], float] = {}
    for alpha in alphas:
        lines += [
            f"## alpha = {alpha}",
            "",
            "| method | " + " | ".join(f"n = {n}" for n in sizes) + " |",
        ]
        lines.append("|---|" + "---|" * len(sizes))
        for method in P5_METHODS:
            row = []
            for n in sizes:
                values = [r["personal_acc"] for r in cells.get((alpha, n, method), [])]
                row.append(mean_std(values))
            lines.append(f"| {method} | " + " | ".join(row) + " |")
        lines.append("")
        for n in sizes:
            fml, avg = cells.get((alpha, n, "fml")), cells.get((alpha, n, "fedavg"))
            if fml and avg:
                central[(alpha, n)] = statistics.mean(r["central_acc"] for r in fml) - (
                    statistics.mean(r["central_acc"] for r in avg)
                )
    lines += ["## FML minus the best other method (personalized, points)", ""]
    lines += _grid(alphas, sizes, diff)
    lines += ["", "## FML's global model minus FedAvg's (central test set, points)", ""]
    lines += _grid(alphas, sizes, central)
    more = cells_for_more_seeds(diff)
    if more:
        lines += [
            "",
            "Cells the protocol also runs at seeds 43 and 44 (FML within 1 point of the best "
            "other method, or the sign changing towards a neighbouring cell), from the cells "
            "finished so far: "
            + ", ".join(f"alpha {a} n = {n}" for a, n in more)
            + " (`python -m tools.evidence p5 --add-seed-runs` lists their runs in the sweep).",
        ]
    if unfinished:
        lines += ["", f"Not finished (left out): {', '.join(unfinished)}."]
    report = folder / "report.md"
    report.write_text("\n".join(lines) + "\n")
    _p5_plot(folder, alphas, sizes, diff, central)
    return report


P5_ALPHAS = (0.1, 0.5, 1.0, 5.0)
P5_SIZES = (100, 300, 1000, 3000)
P5_MORE_SEEDS = (43, 44)


def cells_for_more_seeds(diff: dict[tuple[float, int], float]) -> list[tuple[float, int]]:
    """The cells the protocol runs at seeds 43 and 44 too: FML within 1 point of the best
    other method, or the sign of that difference changing towards a neighbouring cell (the
    next alpha or the next n of the protocol's grid, where it has a value).
    """
    out = set()
    for (alpha, n), value in diff.items():
        if abs(value) < 0.01:
            out.add((alpha, n))
        i, j = P5_ALPHAS.index(alpha), P5_SIZES.index(n)
        for di, dj in ((1, 0), (0, 1)):
            if i + di >= len(P5_ALPHAS) or j + dj >= len(P5_SIZES):
                continue
            other = (P5_ALPHAS[i + di], P5_SIZES[j + dj])
            if other in diff and (value > 0) != (diff[other] > 0):
                out.update({(alpha, n), other})
    return sorted(out, key=lambda c: (c[1], c[0]))  # cheapest (smallest n) first


def add_seed_runs(cells: list[tuple[float, int]], sweep_file: Path) -> list[str]:
    """Append to ``sweep_file`` the runs of ``cells`` at seeds 43 and 44 it does not list;
    return their names.
    """
    listed = {run["name"] for run in yaml.safe_load(sweep_file.read_text())["runs"]}
    added, lines = [], []
    for alpha, n in cells:
        for seed in P5_MORE_SEEDS:
            for method in P5_METHODS:
                name = f"a{alpha}-n{n}-{method}-seed{seed}"
                if name in listed:
                    continue
                added.append(name)
                lines.append(
                    f"  - {{name: {name}, experiment: p4, overrides: {{train.method: {method}, "
                    f"data.dirichlet_alpha: {alpha}, data.max_train_examples: {n}, seed: {seed}}}}}"
                )
    if lines:
        text = sweep_file.read_text()
        if not text.endswith("\n"):
            text += "\n"
        note = "  # seeds 43, 44 where the protocol asks (tools.evidence p5 --add-seed-runs)"
        sweep_file.write_text(text + note + "\n" + "\n".join(lines) + "\n")
    return added


def _grid(alphas: list[float], sizes: list[int], values: dict) -> list[str]:
    lines = ["| alpha | " + " | ".join(f"n = {n}" for n in sizes) + " |"]
    lines.append("|---|" + "---|" * len(sizes))
    for alpha in alphas:
        row = [f"{100 * values[(alpha, n)]:+.2f}" if (alpha, n) in values else "-" for n in sizes]
        lines.append(f"| {alpha} | " + " | ".join(row) + " |")
    return lines


def _p5_plot(
    folder: Path, alphas: list[float], sizes: list[int], diff: dict, central: dict
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    titles = ("FML - best other (personalized)", "FML global - FedAvg (central)")
    for ax, values, title in zip(axes, (diff, central), titles, strict=True):
        grid = np.full((len(alphas), len(sizes)), np.nan)
        for i, a in enumerate(alphas):
            for j, n in enumerate(sizes):
                if (a, n) in values:
                    grid[i, j] = 100 * values[(a, n)]
        bound = np.nanmax(np.abs(grid)) if np.isfinite(grid).any() else 1.0
        image = ax.imshow(grid, cmap="RdBu", vmin=-bound, vmax=bound, origin="lower")
        for i in range(len(alphas)):
            for j in range(len(sizes)):
                if np.isfinite(grid[i, j]):
                    dark = abs(grid[i, j]) > 0.6 * bound  # white text on the deep colours
                    ax.text(
                        j,
                        i,
                        f"{grid[i, j]:+.1f}",
                        ha="center",
                        va="center",
                        fontsize=9,
                        color="white" if dark else "black",
                    )
        ax.set_xticks(range(len(sizes)), [str(n) for n in sizes])
        ax.set_yticks(range(len(alphas)), [str(a) for a in alphas])
        ax.set_xlabel("train examples per client (n)")
        ax.set_ylabel("Dirichlet alpha")
        ax.set_title(f"{title}, points")
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(folder / "heatmaps.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", choices=["p2", "p5"])
    parser.add_argument("--folder", type=Path, default=None, help="the sweep's folder")
    parser.add_argument(
        "--add-seed-runs",
        action="store_true",
        help="p5: append the runs at seeds 43, 44 that the protocol asks for to the sweep file",
    )
    parser.add_argument("--sweep-file", type=Path, default=ROOT / "conf" / "sweeps" / "p5.yaml")
    args = parser.parse_args(argv)
    if args.table == "p2":
        if args.add_seed_runs:
            parser.error("--add-seed-runs is for p5 (p2 lists its three seeds already)")
        print(p2_report((args.folder or RESULTS / "p2_full").resolve()))
        return 0
    folder = (args.folder or RESULTS / "p5").resolve()
    print(p5_report(folder))
    if args.add_seed_runs:
        diff = p5_differences(p5_cells(folder)[0])
        added = add_seed_runs(cells_for_more_seeds(diff), args.sweep_file)
        print(f"{len(added)} runs added to {args.sweep_file.name}: {', '.join(added) or '-'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
