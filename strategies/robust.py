"""FedAvg that drops malformed replies instead of crashing, and keeps a per-round log."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import cast

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.aggregation import (
    IDENTIFIERS,
    aggregate_evaluate_metrics,
    reply_problem,
    weighted_average_arrays,
    weighted_mean_metrics,
)

RoundConfigFn = Callable[[int], dict[str, float | int | str | bool]]


@dataclass
class RoundLog:
    """What happened to the replies of one round (kept for the run's results)."""

    train_sent: int = 0
    train_replies: int = 0
    train_accepted: int = 0
    aggregated: bool = False
    """Whether the global model was updated this round."""
    train_dropped: list[str] = field(default_factory=list)
    evaluate_replies: int = 0
    evaluate_dropped: list[str] = field(default_factory=list)
    train_metrics: dict[str, float] = field(default_factory=dict)
    """Aggregated training metrics (weighted means)."""
    evaluate_metrics: dict[str, float] = field(default_factory=dict)
    """Aggregated evaluation metrics (weighted means, min and max over clients)."""
    clients: dict[int, dict[str, float]] = field(default_factory=dict)
    """Per-client evaluation metrics, by partition id (or node id if none)."""
    train_clients: dict[int, dict[str, float]] = field(default_factory=dict)
    """Per-client training metrics of the accepted replies."""


class RobustFedAvg(FedAvg):
    """Federated Averaging that survives bad replies and records what happened per round.

    The base of every strategy in this project. Compared with Flower's ``FedAvg``:

    - a training reply with wrong keys, shapes or dtypes, NaN/Inf values, or a missing or
      non-positive ``num-examples`` is dropped with a logged reason (node id included)
      instead of raising ``InconsistentMessageReplies`` and stopping the run;
    - integer buffers (e.g. BatchNorm's ``num_batches_tracked``) keep their dtype;
    - evaluation metrics are aggregated into weighted means plus the min/max over clients
      of every ``*_acc`` metric;
    - ``rounds[r]`` (a :class:`RoundLog`) keeps accepted/dropped replies and metrics;
    - ``round_config_fn(server_round)`` adds per-round values (e.g. a decayed learning
      rate) to the training ConfigRecord.

    Parameters
    ----------
    round_config_fn : Optional[callable] (default: None)
        ``server_round -> dict`` merged into each round's training ConfigRecord.
    private_keys : Sequence[str] (default: ())
        State-dict keys that stay on the clients (a private head): never sent to clients,
        never expected back. The rest (the shared body) is averaged.
    min_replies : int (default: 1)
        Fewest valid training replies needed to update the global model; with fewer, the
        round keeps the previous global model. Nodes that fail or time out do not stop
        the run either way.
    join_rounds : Mapping[int, int] (default: {})
        Node id -> the first ``server_round`` in which that node may be sampled (for
        training and evaluation): new participants. Nodes not listed take part from round
        1. Once sampled, a joining node receives the current global model like any other.
    join_rounds_fn : Optional[callable] (default: None)
        ``connected node ids -> {node id: join round}``, asked every round instead of
        ``join_rounds``: for schedules keyed by something the server learns from the nodes
        (this app's ServerApp maps partition ids, asking nodes it has not seen before).
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (``fraction_train``,
        ``min_available_nodes``, ``weighted_by_key``, ...).
    """

    def __init__(
        self,
        round_config_fn: RoundConfigFn | None = None,
        min_replies: int = 1,
        private_keys: Sequence[str] = (),
        join_rounds: Mapping[int, int] | None = None,
        join_rounds_fn: Callable[[list[int]], Mapping[int, int]] | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.private_keys = frozenset(private_keys)
        self.join_rounds = dict(join_rounds or {})
        self.join_rounds_fn = join_rounds_fn
        if min_replies < 1:
            raise ValueError(f"min_replies must be >= 1, got {min_replies}")
        self.round_config_fn = round_config_fn
        self.min_replies = min_replies
        self.reference_arrays: ArrayRecord | None = None
        self.rounds: dict[int, RoundLog] = {}

    def train_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """The training ConfigRecord of ``server_round`` (override to add values)."""
        round_config = ConfigRecord(dict(config))
        if self.round_config_fn is not None:
            round_config.update(self.round_config_fn(server_round))
        return round_config

    def shared(self, arrays: ArrayRecord) -> ArrayRecord:
        """``arrays`` without the private keys (all of them when there are none)."""
        if not self.private_keys:
            return arrays
        return ArrayRecord({k: v for k, v in arrays.items() if k not in self.private_keys})

    def join_rounds_of(self, node_ids: Sequence[int]) -> dict[int, int]:
        """Node id -> first round in which it takes part, for the connected ``node_ids``.

        From ``join_rounds_fn`` when given (it may learn about nodes that connected late),
        else from ``join_rounds``; nodes listed in neither take part from round 1.
        """
        if self.join_rounds_fn is not None:
            return dict(self.join_rounds_fn(list(node_ids)))
        return {n: self.join_rounds.get(n, 1) for n in node_ids}

    @contextmanager
    def participants(self, server_round: int, grid: Grid) -> Iterator[Grid]:
        """``grid`` as sampling should see it in ``server_round``: only the nodes that have
        joined by then (see ``join_rounds``).

        While it is open, the minimum node counts follow the joined nodes:
        ``min_available_nodes`` drops by the number of connected nodes still waiting to
        join, and ``min_train_nodes``/``min_evaluate_nodes`` are at most
        ``ceil(fraction x joined)`` (so a fraction samples a fraction of the joined nodes).
        """
        if not self.join_rounds and self.join_rounds_fn is None:
            yield grid
            return
        rounds = self.join_rounds_of(list(grid.get_node_ids()))
        joined = sum(1 for r in rounds.values() if r <= server_round)
        saved = self.min_available_nodes, self.min_train_nodes, self.min_evaluate_nodes
        self.min_available_nodes = max(1, self.min_available_nodes - (len(rounds) - joined))
        self.min_train_nodes = min(
            self.min_train_nodes, max(1, math.ceil(self.fraction_train * joined))
        )
        if self.fraction_evaluate > 0:
            self.min_evaluate_nodes = min(
                self.min_evaluate_nodes, max(1, math.ceil(self.fraction_evaluate * joined))
            )
        try:
            yield cast(Grid, _JoinedNodes(grid, self.join_rounds_of, server_round))
        finally:
            self.min_available_nodes, self.min_train_nodes, self.min_evaluate_nodes = saved

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the shared global arrays for client-side evaluation to joined nodes."""
        with self.participants(server_round, grid) as nodes:
            return list(
                super().configure_evaluate(server_round, self.shared(arrays), config, nodes)
            )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the shared global arrays and this round's config to the sampled nodes."""
        arrays = self.shared(arrays)
        self.reference_arrays = arrays
        with self.participants(server_round, grid) as nodes:
            messages = list(
                super().configure_train(
                    server_round, arrays, self.train_config(server_round, config), nodes
                )
            )
        self.round_log(server_round).train_sent = len(messages)
        return messages

    def round_log(self, server_round: int) -> RoundLog:
        """The bookkeeping of ``server_round`` (created on first use)."""
        return self.rounds.setdefault(server_round, RoundLog())

    def check_train_reply(self, msg: Message) -> str | None:
        """Why a training reply cannot be aggregated, or ``None`` if it can."""
        if msg.has_error():
            return f"client error: {msg.error.reason}"
        if self.reference_arrays is None:
            return "no reference arrays (configure_train was not called)"
        return reply_problem(
            msg.content, self.reference_arrays, self.arrayrecord_key, self.weighted_by_key
        )

    def aggregate_arrays(self, records: list[ArrayRecord], weights: list[float]) -> ArrayRecord:
        """Weighted average of the memes' arrays (override for other aggregations)."""
        return weighted_average_arrays(records, weights)

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the valid memes weighted by ``num-examples``; drop invalid replies."""
        replies = list(replies)
        book = self.round_log(server_round)
        book.train_replies = len(replies)
        valid: list[RecordDict] = []
        for msg in replies:
            problem = self.check_train_reply(msg)
            if problem is None:
                valid.append(msg.content)
                continue
            reason = f"node {msg.metadata.src_node_id}: {problem}"
            book.train_dropped.append(reason)
            log(WARNING, "aggregate_train: dropped the reply of %s", reason)
        book.train_accepted = len(valid)
        log(
            INFO,
            "aggregate_train: %d replies, %d aggregated, %d dropped",
            len(replies),
            len(valid),
            len(book.train_dropped),
        )
        if not valid:
            log(
                WARNING,
                "aggregate_train: no valid reply in round %d; the global model stays as it was",
                server_round,
            )
            return None, None
        metrics = [next(iter(c.metric_records.values())) for c in valid]
        for m in metrics:
            client = int(m.get("partition_id", len(book.train_clients)))  # type: ignore[arg-type]
            book.train_clients[client] = {
                k: float(v) for k, v in m.items() if isinstance(v, int | float)
            }
        weights = [float(m[self.weighted_by_key]) for m in metrics]  # type: ignore[arg-type]
        records = [c[self.arrayrecord_key] for c in valid if self.arrayrecord_key in c]
        arrays = None
        if len(valid) < self.min_replies:
            log(
                WARNING,
                "aggregate_train: %d valid replies < min_replies=%d in round %d; the global "
                "model stays as it was",
                len(valid),
                self.min_replies,
                server_round,
            )
        elif records:
            arrays = self.aggregate_arrays(records, weights)
            book.aggregated = True
        agg_metrics = weighted_mean_metrics(
            metrics, weights, exclude=(self.weighted_by_key, *IDENTIFIERS)
        )
        agg_metrics["num_clients"] = len(valid)
        book.train_metrics = dict(agg_metrics)  # type: ignore[arg-type]
        return arrays, agg_metrics

    def aggregate_evaluate(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> MetricRecord | None:
        """Weighted means and the spread (min/max over clients) of both models' metrics."""
        replies = list(replies)
        book = self.round_log(server_round)
        book.evaluate_replies = len(replies)
        records: list[MetricRecord] = []
        for msg in replies:
            if msg.has_error():
                problem = f"client error: {msg.error.reason}"
            else:
                problem = None
                mrs = list(msg.content.metric_records.values())
                if len(mrs) != 1:
                    problem = f"expected one MetricRecord, got {len(mrs)}"
                elif not _positive_number(mrs[0].get(self.weighted_by_key)):
                    problem = f"'{self.weighted_by_key}' missing or not > 0"
            if problem is not None:
                reason = f"node {msg.metadata.src_node_id}: {problem}"
                book.evaluate_dropped.append(reason)
                log(WARNING, "aggregate_evaluate: dropped the reply of %s", reason)
                continue
            record = mrs[0]
            records.append(record)
            client_id = int(record.get("partition_id", msg.metadata.src_node_id))  # type: ignore[arg-type]
            book.clients[client_id] = {
                k: float(v)
                for k, v in record.items()  # type: ignore[arg-type]
                if isinstance(v, (int, float))
            }
        if not records:
            return None
        aggregated = aggregate_evaluate_metrics(records, self.weighted_by_key)
        book.evaluate_metrics = dict(aggregated)  # type: ignore[arg-type]
        return aggregated


class _JoinedNodes:
    """The part of a Grid that Flower's sampling reads (``get_node_ids``), restricted to the
    nodes that have joined by ``server_round`` (asked anew on every call, so that Flower's
    wait for nodes sees nodes that connect meanwhile); messages still go through ``grid``.
    """

    def __init__(
        self, grid: Grid, rounds_of: Callable[[list[int]], dict[int, int]], server_round: int
    ) -> None:
        self._grid = grid
        self._rounds_of = rounds_of
        self._round = server_round

    def get_node_ids(self) -> list[int]:
        rounds = self._rounds_of(list(self._grid.get_node_ids()))
        return [n for n, r in rounds.items() if r <= self._round]

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)


def _positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


__all__ = ["RobustFedAvg", "RoundConfigFn", "RoundLog"]
