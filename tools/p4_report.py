"""Protocol P4's curve: final personalized accuracy against the per-client train size n.

    python -m tools.p4_report                      # docs/results/p4 -> curve.md, curve.png

Reads every finished run of the ``p4`` sweep (``docs/results/p4/<run>/metrics.json``; run
names ``n<size>-<method>[-alpha<a>][-seed<s>]``), groups them by method (with its alpha, if
not 0.5) and n, and writes a table (mean ± std over the seeds there are, min and max over
clients of the final round, number of seeds) and a plot of the mean with the seeds' spread.
Nothing is computed that a ``metrics.json`` does not hold; a cell with one seed says so.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"^n(?P<n>\d+)-(?P<method>[a-z]+)(?:-alpha(?P<alpha>[\d.]+))?(?:-seed\d+)?$")


def collect(folder: Path) -> dict[tuple[str, int], list[dict[str, float]]]:
    """``(arm, n) -> [final round of each seed]`` for the finished runs in ``folder``."""
    out: dict[tuple[str, int], list[dict[str, float]]] = defaultdict(list)
    for path in sorted(folder.glob("*/metrics.json")):
        match = NAME.match(path.parent.name)
        if match is None:
            continue
        record = json.loads(path.read_text())
        if not record["run"].get("finished"):
            continue
        final = record["rounds"][-1]
        arm = match["method"] + (f" (alpha {match['alpha']})" if match["alpha"] else "")
        out[(arm, int(match["n"]))].append(final)
    return out


def table(groups: dict[tuple[str, int], list[dict[str, float]]]) -> str:
    """Markdown: one row per arm and n."""
    lines = [
        "| method | n | personalized (mean ± std) | [min, max] over clients | seeds |",
        "|---|---|---|---|---|",
    ]
    for (arm, n), finals in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        accs = [100 * f["personal_acc"] for f in finals]
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else " (one seed)"
        low = min(100 * f["personal_acc_min"] for f in finals)
        high = max(100 * f["personal_acc_max"] for f in finals)
        lines.append(
            f"| {arm} | {n} | {statistics.mean(accs):.2f}{spread} | "
            f"[{low:.2f}, {high:.2f}] | {len(accs)} |"
        )
    return "\n".join(lines) + "\n"


def plot(groups: dict[tuple[str, int], list[dict[str, float]]], path: Path) -> None:
    """Mean personalized accuracy against n (log scale), the seeds' min-max as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in sorted({a for a, _ in groups}):
        ns = sorted(n for a, n in groups if a == arm)
        accs = [[100 * f["personal_acc"] for f in groups[(arm, n)]] for n in ns]
        ax.plot(ns, [statistics.mean(a) for a in accs], marker="o", label=arm)
        ax.fill_between(ns, [min(a) for a in accs], [max(a) for a in accs], alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("train examples per client (n)")
    ax.set_ylabel("final personalized accuracy (%)")
    ax.set_title("P4: CIFAR-10, Dirichlet 0.5, 10 clients, R = 30")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Write ``curve.md`` and ``curve.png`` next to the runs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=ROOT / "docs" / "results" / "p4")
    args = parser.parse_args(argv)
    groups = collect(args.dir)
    if not groups:
        raise SystemExit(f"no finished P4 runs in {args.dir}")
    text = (
        "# P4: final personalized accuracy against n\n\n"
        "Written by `python -m tools.p4_report` from the runs' `metrics.json`. Accuracies "
        "in %, final round (R = 30), mean weighted by test examples; mean ± std over "
        "training seeds.\n\n" + table(groups)
    )
    (args.dir / "curve.md").write_text(text)
    plot(groups, args.dir / "curve.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
