"""ServerApp: fml-flower's ``FedMutualLearning`` strategy averaging the clients' memes."""

from __future__ import annotations

import json
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from strategies import FedMutualLearning
from tabular_fml.task import meme_model

app = ServerApp()


def round_results(strategy: FedMutualLearning) -> list[dict[str, float | int | None]]:
    """Per round: weighted mean accuracies of the personalized and the global model."""
    rows = []
    for server_round, book in sorted(strategy.rounds.items()):
        m = book.evaluate_metrics
        rows.append(
            {
                "round": server_round,
                "personal_acc": float(m["personal_acc"]) if "personal_acc" in m else None,
                "global_acc": float(m["global_acc"]) if "global_acc" in m else None,
                "clients_trained": book.train_accepted,
                "clients_evaluated": int(m.get("num_clients", 0)),
            }
        )
    return rows


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FML for ``num-server-rounds`` rounds and write ``<output-dir>/results.json``."""
    cfg = context.run_config
    lr, min_nodes = float(cfg["lr"]), int(cfg["min-nodes"])

    torch.manual_seed(int(cfg["seed"]))
    meme = meme_model()  # the architecture every client's meme shares
    strategy = FedMutualLearning(
        alpha=float(cfg["alpha"]),
        beta=float(cfg["beta"]),
        round_config_fn=lambda server_round: {"lr": lr},
        fraction_train=1.0,
        min_available_nodes=min_nodes,
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(meme.state_dict()),
        num_rounds=int(cfg["num-server-rounds"]),
    )

    rounds = round_results(strategy)
    out_dir = Path(str(cfg["output-dir"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    run = {k: cfg[k] for k in ("num-server-rounds", "alpha", "beta", "lr", "local-epochs")}
    path.write_text(json.dumps({"run": run, "rounds": rounds}, indent=2))
    final = rounds[-1] if rounds else {}
    log(
        INFO,
        "FML finished: round %s, personalized accuracy %s, global accuracy %s. Results: %s",
        final.get("round"),
        _fmt(final.get("personal_acc")),
        _fmt(final.get("global_acc")),
        path.resolve(),
    )


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "n/a"
