"""Per-round bookkeeping on the server: central evaluation, the round record, progress."""

from __future__ import annotations

import statistics
import time
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from fml_flower.checkpoint import save_checkpoint
from fml_flower.config import FMLConfig
from fml_flower.methods import Method
from fml_flower.models import build_model, resolve_device
from fml_flower.results import RunRecorder
from fml_flower.tensors import PreparedData
from fml_flower.training import Compute, evaluate
from strategies.robust import RobustFedAvg, RoundLog

CHECKPOINT_NAME = "checkpoint.ckpt"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def progress_line(
    record: dict, num_rounds: int, rounds_done_here: int | None = None, num_clients: int = 0
) -> str:
    """One human-readable line about a finished round (``num_clients``: the federation's
    size, to say how many of them the clients' scores cover).
    """
    r, elapsed = record["round"], record["elapsed"]
    done = rounds_done_here or r
    eta = elapsed / done * (num_rounds - r)
    parts = [
        f"[round {r}/{num_rounds}] {record['seconds']:.1f}s, elapsed {elapsed:.0f}s, ETA {eta:.0f}s"
    ]
    parts.extend(client_scores(record, num_clients))
    if record.get("central_acc") is not None:
        parts.append(f"global(central) {record['central_acc']:.4f}")
    if record.get("replies_dropped") or record.get("replies_missing"):
        parts.append(f"dropped {record['replies_dropped']}, missing {record['replies_missing']}")
    if record.get("privacy_epsilon") is not None:
        parts.append(f"epsilon {record['privacy_epsilon']:.3f}")
    if record.get("aggregated") is False:
        parts.append("global model NOT updated (too few valid replies)")
    return " | ".join(parts)


def coverage(record: dict, num_clients: int = 0) -> str:
    """``over k of N clients`` (``over k clients`` without ``num_clients``), from the
    round record's ``clients_evaluated``.
    """
    k = record.get("clients_evaluated")
    if not k:
        return ""
    return f"over {k} of {num_clients} clients" if num_clients else f"over {k} clients"


def client_scores(record: dict, num_clients: int = 0) -> list[str]:
    """The clients' scores of a round record, as progress-line parts, with how many
    clients they cover.
    """
    parts = []
    if "personal_acc" in record:
        parts.append(
            f"personalized {record['personal_acc']:.4f} "
            f"[{record['personal_acc_min']:.3f}-{record['personal_acc_max']:.3f}]"
        )
    if "global_acc" in record:
        parts.append(f"global(clients) {record['global_acc']:.4f}")
    if parts and coverage(record, num_clients):
        parts[-1] += f" ({coverage(record, num_clients)})"
    return parts


class CentralEvaluation:
    """Evaluates the global model centrally, records, checkpoints and shows every round.

    Flower's ``Strategy.start`` calls it after each round's client evaluation, so this is
    where the round's record (client metrics from the strategy, central metrics, timing)
    is assembled and written, and where the global model is checkpointed for a resume.
    ``round_offset`` is the number of rounds a resumed run had done before.
    """

    def __init__(
        self,
        cfg: FMLConfig,
        method: Method,
        data: PreparedData,
        strategy: RobustFedAvg,
        recorder: RunRecorder,
        round_offset: int = 0,
        resumed: bool = False,
        num_clients: int = 0,
        sent_config: dict | None = None,
    ):
        self.cfg = cfg
        self.num_clients = num_clients
        self.sent_config = dict(sent_config or {})
        self.method = method
        device = resolve_device(cfg.train.device)
        self.test = data.central.to(device)
        self.strategy = strategy
        self.recorder = recorder
        self.round_offset = round_offset
        self.resumed = resumed
        model = build_model(cfg.model.meme, data.info.input_shape, data.info.num_classes)
        self.compute = Compute.resolve(cfg.train.precision, cfg.train.memory_format, device, model)
        self.model = self.compute.model(model.to(device))
        self.central = method.central_evaluation(cfg, self.model)
        self.t_start = self.t_last = time.monotonic()
        self.last: tuple[int, ArrayRecord] | None = None
        """The last recorded round and its global model."""

    @property
    def checkpoint_path(self) -> Path:
        """Where the global model of the last finished round is kept."""
        return self.recorder.run_dir / CHECKPOINT_NAME

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Central accuracy and loss of ``arrays``; also records and checkpoints the round."""
        central: dict[str, float] = {}
        t0 = time.monotonic()
        if self.central and (server_round == 0 or self.strategy.evaluates(server_round)):
            self.model.load_state_dict(arrays.to_torch_state_dict())
            res = evaluate(self.model, self.test.x, self.test.y, compute=self.compute)
            central = {"central_acc": res.accuracy, "central_loss": res.loss}
        now = time.monotonic()
        central_seconds = now - t0
        absolute = server_round + self.round_offset
        record: dict = {"round": absolute, "central_acc": None, **central}
        if server_round == 0 and self.resumed:
            log(
                INFO,
                "[resumed at round %d] central accuracy %s",
                absolute,
                _fmt(record["central_acc"]),
            )
            self.t_last = now
            return MetricRecord(central)
        if server_round > 0:
            self.last = (server_round, arrays)
            self.amend_previous(server_round)
            record.update(self.round_record(server_round, absolute))
            record.update(
                seconds=now - self.t_last,
                elapsed=now - self.t_start,
                central_seconds=central_seconds,
            )
            log(
                INFO,
                progress_line(
                    record,
                    self.cfg.federation.num_rounds,
                    absolute - self.round_offset,
                    self.num_clients,
                ),
            )
        else:
            record.update(seconds=0.0, elapsed=0.0)
            log(
                INFO,
                "[round 0] initial global model: central accuracy %s",
                _fmt(record["central_acc"]),
            )
        self.t_last = now
        self.recorder.add_round(record)  # the record first: a checkpoint never runs ahead
        save_checkpoint(
            self.checkpoint_path,
            {
                "round": absolute,
                "arrays": arrays.to_torch_state_dict(),
                "meme": self.cfg.model.meme,
                "method": self.cfg.train.method,
            },
        )
        return MetricRecord(central)

    def amend_previous(self, server_round: int) -> None:
        """With ``federation.evaluation: in-train``, the clients' scores of the previous
        round came with this round's training replies: add them to its record.
        """
        book = self.strategy.rounds.get(server_round - 1)
        if book is None or not book.evaluated_late:
            return
        fields = self.evaluation_fields(book)
        self.recorder.amend_round(server_round - 1 + self.round_offset, fields)
        scores = client_scores(fields, self.num_clients)
        if scores:
            log(
                INFO,
                "[round %d, scored by its clients before round %d] %s",
                server_round - 1 + self.round_offset,
                server_round + self.round_offset,
                " | ".join(scores),
            )

    def evaluate_last(self, grid: Grid, timeout: float) -> None:
        """A run that stops early with ``federation.evaluation: in-train`` (a privacy
        budget, every client refusing) has not had its last recorded round scored by the
        clients: send that round's evaluation messages now and add the scores.
        """
        if not self.strategy.evaluate_in_train or self.last is None:
            return
        server_round, arrays = self.last
        book = self.strategy.round_log(server_round)
        if not book.evaluate_metrics:  # (a DP wrapper's start may have scored it already)
            config = ConfigRecord(self.sent_config)
            self.strategy.score_last_round(grid, arrays, config, timeout)
        record = next(
            r for r in self.recorder.rounds if r["round"] == server_round + self.round_offset
        )
        if record.get("clients_evaluated"):
            return  # already in the record
        fields = self.evaluation_fields(book)
        self.recorder.amend_round(server_round + self.round_offset, fields)
        log(
            INFO,
            "[round %d, scored by its clients as the run stops] %s",
            server_round + self.round_offset,
            " | ".join(client_scores(fields, self.num_clients)) or "no scores",
        )

    @staticmethod
    def evaluation_fields(book: RoundLog) -> dict:
        """A round's client evaluation as record fields."""
        fields: dict = {**book.evaluate_metrics}
        fields.pop("num_clients", None)
        fields.update(
            clients_evaluated=int(book.evaluate_metrics.get("num_clients", 0)),
            clients={str(k): v for k, v in sorted(book.clients.items())},
        )
        return fields

    def round_record(self, server_round: int, absolute: int) -> dict:
        """What the strategy saw in ``server_round``: client metrics, drops, settings."""
        book = self.strategy.round_log(server_round)
        settings = self.strategy.settings(server_round)  # what the clients were sent
        record: dict = {**book.evaluate_metrics}
        record.update({k: v for k, v in book.train_metrics.items() if k.startswith("train_")})
        record.pop("num_clients", None)
        record.update(
            lr=settings.lr,
            alpha=settings.alpha,
            beta=settings.beta,
            aggregated=book.aggregated if self.method.sends_model else None,
            clients_sampled=book.train_sent,
            clients_trained=book.train_accepted,
            clients_evaluated=int(book.evaluate_metrics.get("num_clients", 0)),
            replies_dropped=len(book.train_dropped) + len(book.evaluate_dropped),
            replies_missing=max(book.train_sent - book.train_replies, 0),
            dropped_reasons=book.train_dropped + book.evaluate_dropped,
            clients_failed={
                self.strategy.client_label(node): reason
                for node, reason in book.failed_nodes.items()
            },
            clients={str(k): v for k, v in sorted(book.clients.items())},
            clients_train={str(k): v for k, v in sorted(book.train_clients.items())},
        )
        if book.update_norms:  # how far each accepted reply moved from the global model
            norms = sorted(book.update_norms.values())
            record.update(
                update_norm_median=statistics.median(norms),
                update_norm_max=norms[-1],
                update_norms={str(k): v for k, v in sorted(book.update_norms.items())},
            )
        record.update(book.privacy)  # epsilon so far, released or not (with DP only)
        if self.resumed and server_round == 1:
            self.warn_fresh_personal_models(book.train_clients)
        return record

    def warn_fresh_personal_models(self, train_clients: dict[int, dict[str, float]]) -> None:
        """After a resume, say which clients could not restore a personalized model."""
        if self.method.keeps == "nothing":
            return
        joins = self.cfg.federation.join_round  # clients joining after the resume are new
        fresh = sorted(
            c
            for c, m in train_clients.items()
            if m.get("personal_restored_from_disk") != 1.0 and joins.get(c, 1) <= self.round_offset
        )
        if fresh:
            log(
                WARNING,
                "resumed run: clients %s started NEW personalized models (no "
                "state-dir in their node config, or no file in it); only the global model "
                "was resumed for them",
                fresh,
            )
