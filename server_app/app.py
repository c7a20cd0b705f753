"""The FML ServerApp: validate, build the initial meme, run the strategy, save results."""

from __future__ import annotations

import time
from datetime import datetime
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fml_flower.config import FMLConfig, config_from_run_config, to_yaml
from fml_flower.data import FederatedImageData, federated_data
from fml_flower.models import build_model, cpu_state_dict, head_keys, resolve_device
from fml_flower.results import RunRecorder, plot_run
from fml_flower.schedule import round_settings
from fml_flower.training import evaluate
from strategies.baselines import Ditto, FedAvgBaseline, FedPer, FedProx, LocalOnly
from strategies.fml import FedMutualLearning
from strategies.robust import RobustFedAvg

app = ServerApp()


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float) -> int:
    """Wait until at least ``min_nodes`` nodes are connected; return how many are."""
    deadline = time.monotonic() + timeout
    while (n := len(list(grid.get_node_ids()))) < min_nodes:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {n} node(s) connected after {timeout:.0f} s, federation.min_nodes="
                f"{min_nodes}; start more SuperNodes or lower federation.min_nodes"
            )
        time.sleep(0.5)
    return n


def run_dir_for(cfg: FMLConfig) -> Path:
    """The folder this run writes to (absolute)."""
    name = cfg.output.run_name or f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.experiment}"
    return (Path(cfg.output.dir).expanduser() / name).resolve()


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def progress_line(record: dict, num_rounds: int) -> str:
    """One human-readable line about a finished round."""
    r, elapsed = record["round"], record["elapsed"]
    eta = elapsed / r * (num_rounds - r)
    parts = [
        f"[round {r}/{num_rounds}] {record['seconds']:.1f}s, elapsed {elapsed:.0f}s, ETA {eta:.0f}s"
    ]
    if "personal_acc" in record:
        parts.append(
            f"personalized {record['personal_acc']:.4f} "
            f"[{record['personal_acc_min']:.3f}-{record['personal_acc_max']:.3f}]"
        )
    if "global_acc" in record:
        parts.append(f"global(clients) {record['global_acc']:.4f}")
    if record.get("central_acc") is not None:
        parts.append(f"global(central) {record['central_acc']:.4f}")
    if record.get("replies_dropped"):
        parts.append(f"dropped {record['replies_dropped']}")
    return " | ".join(parts)


class CentralEvaluation:
    """Evaluates the global model on the central test set and records every round.

    Flower's ``Strategy.start`` calls it after each round's client evaluation, so this is
    where the round's record (client metrics from the strategy, central metrics, timing)
    is assembled, written and shown.
    """

    def __init__(
        self,
        cfg: FMLConfig,
        data: FederatedImageData,
        strategy: RobustFedAvg,
        recorder: RunRecorder,
    ):
        self.cfg = cfg
        device = resolve_device(cfg.train.device)
        self.test = data.central_test().to(device)
        self.info = data.info
        self.strategy = strategy
        self.recorder = recorder
        self.model = build_model(cfg.model.meme, data.info.input_shape, data.info.num_classes).to(
            device
        )
        self.t_start = self.t_last = time.monotonic()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Central accuracy and loss of ``arrays``; also records the round."""
        central: dict[str, float] = {}
        if self.cfg.train.method in HAS_GLOBAL_MODEL:
            self.model.load_state_dict(arrays.to_torch_state_dict())
            res = evaluate(self.model, self.test.x, self.test.y)
            central = {"central_acc": res.accuracy, "central_loss": res.loss}
        now = time.monotonic()
        record: dict = {"round": server_round, "central_acc": None, **central}
        if server_round > 0:
            book = self.strategy.round_log(server_round)
            settings = round_settings(self.cfg.train, server_round)
            record.update(book.evaluate_metrics)
            record.update({k: v for k, v in book.train_metrics.items() if k.startswith("train_")})
            record.update(
                lr=settings.lr,
                alpha=settings.alpha,
                beta=settings.beta,
                clients_trained=book.train_accepted,
                clients_evaluated=int(book.evaluate_metrics.get("num_clients", 0)),
                replies_dropped=len(book.train_dropped) + len(book.evaluate_dropped),
                dropped_reasons=book.train_dropped + book.evaluate_dropped,
                seconds=now - self.t_last,
                elapsed=now - self.t_start,
                clients={str(k): v for k, v in sorted(book.clients.items())},
            )
            record.pop("num_clients", None)
            log(INFO, progress_line(record, self.cfg.federation.num_rounds))
        else:
            record.update(seconds=0.0, elapsed=0.0)
            log(
                INFO,
                "[round 0] initial global model: central accuracy %s",
                _fmt(record["central_acc"]),
            )
        self.t_last = now
        self.recorder.add_round(record)
        return MetricRecord(central)


def make_strategy(cfg: FMLConfig, private_keys: list[str]) -> RobustFedAvg:
    """The strategy of ``train.method``, with this configuration's federation settings.

    ``private_keys`` are the global model's head keys (FedPer keeps them on clients).
    """
    f, t = cfg.federation, cfg.train

    def round_config(server_round: int) -> dict[str, float | int | str | bool]:
        s = round_settings(t, server_round)
        return {"lr": s.lr, "alpha": s.alpha, "beta": s.beta}

    common: dict = dict(
        round_config_fn=round_config,
        fraction_train=f.fraction_train,
        fraction_evaluate=f.fraction_evaluate,
        min_train_nodes=f.min_nodes,
        min_evaluate_nodes=f.min_nodes if f.fraction_evaluate > 0 else 0,
        min_available_nodes=f.min_nodes,
    )
    if t.method == "fml":
        return FedMutualLearning(alpha=t.alpha, beta=t.beta, **common)
    if t.method == "fedavg":
        return FedAvgBaseline(**common)
    if t.method == "fedprox":
        return FedProx(proximal_mu=t.proximal_mu, **common)
    if t.method == "ditto":
        return Ditto(ditto_lambda=t.ditto_lambda, **common)
    if t.method == "fedper":
        return FedPer(private_keys=private_keys, **common)
    if t.method == "local":
        return LocalOnly(**common)
    raise ValueError(f"train.method: unknown '{t.method}'")


HAS_GLOBAL_MODEL = ("fml", "fedavg", "fedprox", "ditto")
"""Methods whose server holds a complete model to evaluate centrally (FedPer's global
model has no head, local-only has none)."""


def run_fml(grid: Grid, cfg: FMLConfig) -> Path:
    """Run FML for ``cfg.federation.num_rounds`` rounds; return the results folder."""
    t0 = time.monotonic()
    num_nodes = wait_for_nodes(grid, cfg.federation.min_nodes, cfg.federation.round_timeout)
    data = federated_data(cfg.data, num_nodes)
    sizes = data.check_partitions(num_nodes)
    meme = build_model(cfg.model.meme, data.info.input_shape, data.info.num_classes, seed=cfg.seed)
    run_dir = run_dir_for(cfg)
    recorder = RunRecorder(
        run_dir,
        {
            "experiment": cfg.experiment,
            "method": cfg.train.method,
            "started": datetime.now().isoformat(timespec="seconds"),
            "num_nodes": num_nodes,
            "partition_sizes": sizes,
            "input_shape": list(data.info.input_shape),
            "num_classes": data.info.num_classes,
        },
        to_yaml(cfg),
    )
    log(
        INFO,
        "%s: %d nodes, data %s/%s (%s), meme %s, local %s; results in %s",
        cfg.train.method.upper(),
        num_nodes,
        cfg.data.source,
        cfg.data.name,
        cfg.data.partitioner,
        cfg.model.meme,
        cfg.model.local,
        run_dir,
    )

    strategy = make_strategy(cfg, head_keys(meme))
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(cpu_state_dict(meme)),
        num_rounds=cfg.federation.num_rounds,
        timeout=cfg.federation.round_timeout,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=CentralEvaluation(cfg, data, strategy, recorder),
    )
    recorder.finish(
        finished=datetime.now().isoformat(timespec="seconds"), seconds=time.monotonic() - t0
    )
    if cfg.output.plot:
        plot_run(run_dir)
    final = recorder.rounds[-1]
    log(
        INFO,
        "%s finished in %.0fs. Final round %d: personalized %s, global(clients) %s, "
        "global(central) %s. Results: %s",
        cfg.train.method.upper(),
        time.monotonic() - t0,
        final["round"],
        _fmt(final.get("personal_acc")),
        _fmt(final.get("global_acc")),
        _fmt(final.get("central_acc")),
        run_dir,
    )
    return run_dir


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of the ServerApp."""
    run_fml(grid, config_from_run_config(context.run_config))
