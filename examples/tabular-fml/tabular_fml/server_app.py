"""ServerApp: fml-flower's ``FedMutualLearning`` strategy averaging the clients' memes."""

from __future__ import annotations

import json
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, UserConfig
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from strategies import FedMutualLearning
from tabular_fml.task import meme_model

app = ServerApp()


def fml_strategy(cfg: UserConfig) -> FedMutualLearning:
    """The strategy, with everything the clients train with taken from the run-config.

    ``FedMutualLearning`` sends these values to the clients in every training message.
    """
    min_nodes = int(cfg["min-nodes"])
    return FedMutualLearning(
        alpha=float(cfg["alpha"]),
        beta=float(cfg["beta"]),
        lr=float(cfg["lr"]),
        local_epochs=int(cfg["local-epochs"]),
        batch_size=int(cfg["batch-size"]),
        momentum=float(cfg["momentum"]),
        min_available_nodes=min_nodes,
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes,
    )


def round_results(result: Result, num_rounds: int) -> list[dict[str, float | int | None]]:
    """Per round: weighted mean accuracies of the personalized and the global model."""
    rows = []
    for server_round in range(1, num_rounds + 1):
        train = result.train_metrics_clientapp.get(server_round, {})
        evaluation = result.evaluate_metrics_clientapp.get(server_round, {})
        rows.append(
            {
                "round": server_round,
                "personal_acc": _float(evaluation.get("personal_acc")),
                "global_acc": _float(evaluation.get("global_acc")),
                "clients_trained": int(train.get("num_clients", 0)),
                "clients_evaluated": int(evaluation.get("num_clients", 0)),
            }
        )
    return rows


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FML for ``num-server-rounds`` rounds and write ``<output-dir>/results.json``."""
    cfg = context.run_config
    num_rounds = int(cfg["num-server-rounds"])
    torch.manual_seed(int(cfg["seed"]))
    meme = meme_model()  # the architecture every client's meme shares

    strategy = fml_strategy(cfg)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(meme.state_dict()),
        num_rounds=num_rounds,
    )

    rounds = round_results(result, num_rounds)
    out_dir = Path(str(cfg["output-dir"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    keys = ("num-server-rounds", "alpha", "beta", "lr", "momentum", "local-epochs", "batch-size")
    run = {k: cfg[k] for k in keys}
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


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "n/a"
