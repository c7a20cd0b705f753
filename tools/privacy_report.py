"""The tables and plots of #16 from the ``privacy`` and ``poisoning`` sweeps' metrics files.

    python -m tools.privacy_report        # docs/results/{privacy,poisoning} -> report.md, *.png

Privacy (run names ``<method>-clean`` or ``<method>-z<noise multiplier>``): final-round
personalized accuracy (mean and [min, max] over clients), the global model's accuracy on
the clients' test parts and on the central test set, the final epsilon at the recorded
delta, and the median update norm of the clean runs (what the clipping norm was chosen
from). Poisoning (``<rule>-<attack>``): the same accuracies, plus the personalized
accuracy of the honest clients alone (the attacker, ``attack.clients``, left out).
Nothing is computed that a ``metrics.json`` does not hold.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PRIVACY = re.compile(r"^(?P<method>[a-z]+)-(?:clean|z(?P<z>[\d.]+))$")
POISON = re.compile(r"^(?P<rule>mean|trimmed|median)-(?P<attack>clean|scale|random)$")


def _runs(folder: Path, unfinished: bool = False) -> dict[str, dict]:
    """Finished runs by folder name (and, with ``unfinished``, runs that stopped)."""
    out = {}
    for path in sorted(folder.glob("*/metrics.json")):
        record = json.loads(path.read_text())
        if record["run"].get("finished") or (unfinished and len(record["rounds"]) > 1):
            record["config"] = yaml.safe_load((path.parent / "config.yaml").read_text())
            out[path.parent.name] = record
    return out


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _honest_personal(final: dict, attackers: list[int]) -> float | None:
    clients = {int(k): v for k, v in final.get("clients", {}).items() if int(k) not in attackers}
    scored = [
        (c["personal_acc"], c.get("num-examples", 1.0))
        for c in clients.values()
        if "personal_acc" in c
    ]
    total = sum(w for _, w in scored)
    return sum(a * w for a, w in scored) / total if scored else None  # weighted by test examples


def privacy_table(runs: dict[str, dict]) -> tuple[str, list[tuple[str, float | None, dict]]]:
    """Markdown table and the rows (method, z or None for clean, final round)."""
    rows = []
    for name, record in runs.items():
        match = PRIVACY.match(name)
        if match:
            z = float(match["z"]) if match["z"] is not None else None
            rows.append((match["method"], z, record))
    rows.sort(key=lambda r: (r[0], -1 if r[1] is None else r[1]))
    lines = [
        "| method | privacy | personalized [min, max] | global (clients) | global (central) "
        "| epsilon (delta) | update norm, median of the round medians (clean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, z, record in rows:
        final = record["rounds"][-1]
        if z is None:
            norms = [r["update_norm_median"] for r in record["rounds"] if "update_norm_median" in r]
            label, eps = "none", "-"
            norm = f"{statistics.median(norms):.3f}" if norms else "n/a"
        else:
            c = record["config"]["privacy"]
            label = f"server-fixed, z = {z:g}, C = {c['clipping_norm']:g}"
            e = final.get("privacy_epsilon")
            eps = "inf (no noise)" if e is None else f"{e:.2f} ({final['privacy_delta']:g})"
            norm = "-"
        lines.append(
            f"| {method} | {label} | {_pct(final.get('personal_acc'))} "
            f"[{_pct(final.get('personal_acc_min'))}, {_pct(final.get('personal_acc_max'))}] "
            f"| {_pct(final.get('global_acc'))} | {_pct(final.get('central_acc'))} | {eps} "
            f"| {norm} |"
        )
    return "\n".join(lines) + "\n", [(m, z, r["rounds"][-1]) for m, z, r in rows]


def poisoning_table(runs: dict[str, dict], clean_mean: dict | None) -> str:
    """Markdown: one row per aggregation rule and attack."""
    rows = []
    for name, record in runs.items():
        match = POISON.match(name)
        if match:
            rows.append((match["rule"], match["attack"], record))
    if clean_mean is not None:
        rows.append(("mean", "clean", clean_mean))
    order = {"clean": 0, "scale": 1, "random": 2}
    rows.sort(key=lambda r: (order[r[1]], r[0]))
    lines = [
        "| attack | aggregation | rounds | personalized, all | personalized, honest clients "
        "| global (clients) | global (central) |",
        "|---|---|---|---|---|---|---|",
    ]
    for rule, attack, record in rows:
        final = record["rounds"][-1]
        attackers = record["config"].get("attack", {}).get("clients", [])
        label = {"mean": "mean (FedAvg)", "trimmed": "trimmed mean (10%)", "median": "median"}
        who = "" if attack == "clean" else f" (client {','.join(map(str, attackers))})"
        planned = record["config"]["federation"]["num_rounds"]
        done = (
            f"{final['round']}"
            if record["run"].get("finished")
            else (f"{final['round']} of {planned}: stopped (see below)")
        )
        lines.append(
            f"| {attack}{who} | {label[rule]} | {done} | {_pct(final.get('personal_acc'))} "
            f"| {_pct(_honest_personal(final, attackers))} | {_pct(final.get('global_acc'))} "
            f"| {_pct(final.get('central_acc'))} |"
        )
    return "\n".join(lines) + "\n"


def privacy_plot(rows: list[tuple[str, float | None, dict]], path: Path, clip: str) -> None:
    """Accuracy against the noise multiplier, with the final epsilon on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, style in (("fml", "-o"), ("fedavg", "--s")):
        pts = sorted((z, f) for m, z, f in rows if m == method and z is not None)
        if not pts:
            continue
        zs = [z for z, _ in pts]
        ax.plot(
            zs, [100 * f["personal_acc"] for _, f in pts], style, label=f"{method}: personalized"
        )
        ax.plot(
            zs,
            [100 * (f.get("central_acc") or 0) for _, f in pts],
            style,
            alpha=0.5,
            label=f"{method}: global (central)",
        )
    eps = sorted(
        (z, f["privacy_epsilon"])
        for m, z, f in rows
        if m == "fml" and z is not None and f.get("privacy_epsilon") is not None
    )
    for z, e in eps:
        ax.annotate(f"eps {e:.0f}", (z, 5), ha="center", fontsize=8)
    for method, color in (("fml", "C0"), ("fedavg", "C2")):
        clean = [f for m, z, f in rows if m == method and z is None]
        if clean:
            ax.axhline(
                100 * clean[0]["personal_acc"],
                color=color,
                ls=":",
                lw=1,
                label=f"{method}: personalized, no DP",
            )
    ax.set_xlabel(f"noise multiplier z (server-side fixed clipping, C = {clip})")
    ax.set_ylabel("final-round accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Embedded MNIST-5k, 10 clients, R = 10 (epsilon at delta 1e-5)")
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def poisoning_plot(runs: dict[str, dict], clean_mean: dict | None, path: Path) -> None:
    """Central accuracy of the global model per round, one line per rule and attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    styles = {"mean": "-", "trimmed": "--", "median": ":"}
    colors = {"clean": "C0", "scale": "C3", "random": "C1"}
    items = [(POISON.match(n), r) for n, r in runs.items()]
    items = [(m["rule"], m["attack"], r) for m, r in items if m]
    if clean_mean is not None:
        items.append(("mean", "clean", clean_mean))
    for rule, attack, record in sorted(items):
        rounds = [r for r in record["rounds"] if r["round"] > 0]
        xs = [r["round"] for r in rounds]
        label = f"{rule}, {attack}"
        axes[0].plot(
            xs,
            [100 * (r.get("central_acc") or 0) for r in rounds],
            styles[rule],
            color=colors[attack],
            label=label,
        )
        pts = [(r["round"], 100 * r["personal_acc"]) for r in rounds if "personal_acc" in r]
        axes[1].plot(
            [x for x, _ in pts],
            [y for _, y in pts],
            styles[rule],
            color=colors[attack],
            label=label,
        )
    axes[0].set_title("global model, central test set")
    axes[1].set_title("personalized models (mean over clients)")
    for ax in axes:
        ax.set_xlabel("round")
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Client 3 of 10 poisons its meme every round (embedded MNIST-5k, R = 10)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Write ``report.md`` and the plots (``privacy.png``, ``poisoning.png``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args(argv)
    privacy = _runs(args.out / "privacy")
    text, rows = privacy_table(privacy)
    (args.out / "privacy" / "report.md").write_text(text)
    clips = {
        f"{r['config']['privacy']['clipping_norm']:g}"
        for r in privacy.values()
        if r["config"]["privacy"]["mode"] != "none"
    }
    privacy_plot(rows, args.out / "privacy" / "privacy.png", "/".join(sorted(clips)))
    print(text)
    poison_dir = args.out / "poisoning"
    if poison_dir.is_dir():
        poison_runs = _runs(poison_dir, unfinished=True)
        ptext = poisoning_table(poison_runs, privacy.get("fml-clean"))
        poisoning_plot(poison_runs, privacy.get("fml-clean"), poison_dir / "poisoning.png")
        (poison_dir / "report.md").write_text(ptext)
        print(ptext)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
