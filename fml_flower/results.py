"""A run's results folder: ``metrics.json``, ``metrics.csv``, ``config.yaml``, plots.

``metrics.json`` is ``{"run": {...}, "rounds": [{...}, ...]}`` with one record per round
and plainly named keys (``round``, ``personal_acc``, ``personal_acc_min``,
``personal_acc_max``, ``global_acc``, ``central_acc``, ``train_loss_local``,
``train_loss_meme``, ``seconds``, ...). Files are rewritten atomically after every round,
so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROUND_COLUMNS = (
    "round",
    "personal_acc",
    "personal_acc_min",
    "personal_acc_max",
    "global_acc",
    "global_acc_min",
    "global_acc_max",
    "central_acc",
    "central_loss",
    "personal_loss",
    "global_loss",
    "train_loss_local",
    "train_loss_meme",
    "train_acc_local",
    "train_acc_meme",
    "lr",
    "alpha",
    "beta",
    "clients_trained",
    "clients_evaluated",
    "replies_dropped",
    "seconds",
    "elapsed",
)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunRecorder:
    """Collects one record per round and keeps the run folder up to date."""

    def __init__(
        self,
        run_dir: Path,
        run_info: Mapping[str, Any],
        config_yaml: str,
        tensorboard: bool = False,
    ):
        self.run_dir = run_dir
        self.run_dir.mkdir(parents=True, exist_ok=False)
        self.run_info: dict[str, Any] = dict(run_info)
        self.rounds: list[dict[str, Any]] = []
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        write_atomic(run_dir / "config.yaml", config_yaml)

    def add_round(self, record: Mapping[str, Any]) -> None:
        """Append one round's record and rewrite ``metrics.json`` and ``metrics.csv``."""
        self.rounds.append(dict(record))
        self._write()
        if self.writer is not None:
            for key, value in record.items():
                if (
                    isinstance(value, int | float)
                    and not isinstance(value, bool)
                    and key != "round"
                ):
                    self.writer.add_scalar(key, value, global_step=int(record["round"]))
            self.writer.flush()

    def amend_round(self, round_: int, fields: Mapping[str, Any]) -> None:
        """Add ``fields`` to the record of round ``round_`` (metrics that arrive one round
        later, see ``federation.evaluation``) and rewrite the files.
        """
        for record in self.rounds:
            if record["round"] == round_:
                record.update(fields)
                self._write()
                if self.writer is not None:
                    for key, value in fields.items():
                        if isinstance(value, int | float) and not isinstance(value, bool):
                            self.writer.add_scalar(key, value, global_step=round_)
                    self.writer.flush()
                return
        raise KeyError(f"no record of round {round_} to amend")

    def finish(self, **info: Any) -> None:
        """Record final run information (e.g. total time) and rewrite the files."""
        self.run_info.update(info)
        self._write()
        if self.writer is not None:
            self.writer.close()

    def _write(self) -> None:
        payload = {"run": self.run_info, "rounds": self.rounds}
        write_atomic(self.run_dir / "metrics.json", json.dumps(payload, indent=1) + "\n")
        write_atomic(self.run_dir / "metrics.csv", rounds_to_csv(self.rounds))


def rounds_to_csv(rounds: list[Mapping[str, Any]]) -> str:
    """The scalar columns of the round records as CSV text."""
    extra = sorted(
        {
            k
            for r in rounds
            for k, v in r.items()
            if k not in ROUND_COLUMNS and not isinstance(v, (dict, list))
        }
    )
    columns = list(ROUND_COLUMNS) + extra

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rounds)
    return buf.getvalue()


def load_metrics(run_dir: Path) -> dict[str, Any]:
    """Read a run folder's ``metrics.json``."""
    with open(run_dir / "metrics.json") as fh:
        return json.load(fh)


def plot_run(run_dir: Path) -> list[Path]:
    """Accuracy per round and per-client personalized accuracy, as PNGs in the run folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = load_metrics(run_dir)
    rounds, method = metrics["rounds"], metrics["run"].get("method", "fml").upper()
    trained = [r for r in rounds if r["round"] > 0]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    personal = [r for r in trained if r.get("personal_acc") is not None]
    if personal:
        px = [r["round"] for r in personal]
        ax.plot(px, [r["personal_acc"] for r in personal], "o-", label="personalized (own test)")
        ax.fill_between(
            px,
            [r["personal_acc_min"] for r in personal],
            [r["personal_acc_max"] for r in personal],
            alpha=0.15,
            label="personalized min-max over clients",
        )
    global_ = [r for r in trained if r.get("global_acc") is not None]
    if global_:
        ax.plot(
            [r["round"] for r in global_],
            [r["global_acc"] for r in global_],
            "s-",
            label="global (clients' test)",
        )
    central = [r for r in rounds if r.get("central_acc") is not None]
    ax.plot(
        [r["round"] for r in central],
        [r["central_acc"] for r in central],
        "^--",
        label="global (central test)",
    )
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="best", fontsize=8, framealpha=0.8)
    ax.set_title(f"{method} - {run_dir.name}")
    fig.tight_layout()
    written.append(run_dir / "accuracy.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    per_client: dict[str, list[tuple[int, float]]] = {}
    for r in trained:
        for cid, m in (r.get("clients") or {}).items():
            if "personal_acc" in m:
                per_client.setdefault(cid, []).append((r["round"], m["personal_acc"]))
    if per_client:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for cid in sorted(per_client, key=int):
            pts = per_client[cid]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1, label=f"client {cid}")
        ax.set_xlabel("round")
        ax.set_ylabel("personalized accuracy (own test)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if len(per_client) <= 12:
            ax.legend(fontsize=7, ncol=2, loc="lower right")
        fig.tight_layout()
        written.append(run_dir / "clients.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


SUMMARY_METRICS = (
    ("personal_acc", "personalized (own test)"),
    ("global_acc", "global (clients' test)"),
    ("central_acc", "global (central test)"),
)


def summary_table(rounds: list[dict[str, Any]], last_k: int = 3) -> str:
    """A plain-text table of the final round, the mean of the last ``last_k`` rounds and
    the best round of every accuracy (final first: "best round" alone flatters).
    """
    trained = [r for r in rounds if r["round"] > 0]
    lines = [f"{'metric':<26}{'final':>8}{f'last-{last_k} mean':>14}{'best (round)':>16}"]
    for key, label in SUMMARY_METRICS:
        values = [(r["round"], r[key]) for r in trained if r.get(key) is not None]
        if not values:
            continue
        tail = [v for _, v in values[-last_k:]]
        best_round, best = max(values, key=lambda rv: rv[1])
        lines.append(
            f"{label:<26}{values[-1][1]:>8.4f}{sum(tail) / len(tail):>14.4f}"
            f"{best:>10.4f} ({best_round})"
        )
    return "\n".join(lines)
