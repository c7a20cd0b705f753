"""FedAvg that sends the clients' training settings, drops malformed replies instead of
crashing, averages integer-safely, and keeps a per-round log.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from logging import DEBUG, INFO, WARNING
from typing import Any, Protocol, TypedDict

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from fml_flower.settings import (
    PerRound,
    RoundSettings,
    Schedule,
    as_schedule,
    check_schedule_length,
    value_at,
)
from strategies.aggregation import (
    IDENTIFIERS,
    aggregate_evaluate_metrics,
    describe_error,
    reply_problem,
    update_norm,
    weighted_mean_metrics,
)
from strategies.aggregators import Aggregator, aggregator_warning, as_aggregator, weights_used

Participation = Callable[[int, list[int]], list[int]]
"""``(server_round, connected node ids) -> node ids that may be sampled in that round``."""


class StrategyOptions(TypedDict, total=False):
    """The keyword parameters of :class:`RobustFedAvg` (for subclasses' ``**options``)."""

    lr: Schedule
    local_epochs: int
    batch_size: int
    momentum: float
    weight_decay: float
    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int
    min_replies: int
    private_keys: Sequence[str]
    aggregator: Aggregator | None
    weighting: str
    participation: Participation | None
    evaluate_in_train: bool
    evaluate_every: int
    node_wait: float | None
    round_offset: int
    weighted_by_key: str
    arrayrecord_key: str
    configrecord_key: str


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
    update_norms: dict[int, float] = field(default_factory=dict)
    """L2 norm of each accepted reply's update (its arrays minus the global ones sent)."""
    screened: bool = False
    """Whether the training replies were checked already (by a wrapper such as
    :mod:`strategies.privacy`, which checks them before clipping)."""
    privacy: dict[str, float | None] = field(default_factory=dict)
    """What a differential-privacy wrapper released this round (epsilon so far, ...)."""
    evaluated_late: bool = False
    """The evaluation metrics of this round came with the next round's training replies
    (``evaluate_in_train``), after this round's record was first written."""
    sent: dict[str, Any] = field(default_factory=dict)
    """The training config sent to every sampled client (``lr``, ``alpha``, ``beta``, ...)."""
    sampled: list[int] = field(default_factory=list)
    """Node ids sampled for training."""
    failed: dict[int, str] = field(default_factory=dict)
    """Client (partition id, else node id) -> one-line reason, for the clients whose
    training failed this round (their evaluation of this round is left out)."""
    failed_nodes: dict[int, str] = field(default_factory=dict)
    """The same, by node id."""


class RobustFedAvg(FedAvg):
    """Federated Averaging that sends the clients' training settings and survives bad replies.

    The base of every strategy in this project. Compared with Flower's ``FedAvg``:

    - every training ConfigRecord carries the round's client settings (``lr``,
      ``local-epochs``, ``batch-size``, ``momentum``, ``weight-decay``, ``round``; see
      :mod:`fml_flower.settings`), so a client needs nothing but the message;
    - a training reply with wrong keys, shapes or dtypes, NaN/Inf values, or a missing or
      non-positive ``num-examples`` is dropped with a logged reason (node id included)
      instead of raising ``InconsistentMessageReplies`` and stopping the run;
    - integer buffers (e.g. BatchNorm's ``num_batches_tracked``) keep their dtype;
    - evaluation metrics are aggregated into weighted means plus the min/max over clients
      of every ``*_acc`` metric;
    - ``rounds[r]`` (a :class:`RoundLog`) keeps accepted/dropped replies and metrics.

    Parameters
    ----------
    lr : float | Callable[[int], float] | Sequence[float] (default: 0.01)
        Clients' SGD learning rate: a constant, a function of the round (1-based, absolute)
        or a list with one value per round (checked against the rounds at ``start``).
    local_epochs : int (default: 1)
        Local epochs per round.
    batch_size : int (default: 32)
        Clients' mini-batch size.
    momentum : float (default: 0.0)
        Clients' SGD momentum, in [0, 1).
    weight_decay : float (default: 0.0)
        Clients' SGD weight decay.
    fraction_train : float (default: 1.0)
        Fraction of nodes sampled for training.
    fraction_evaluate : float (default: 1.0)
        Fraction of nodes sampled for evaluation (0 disables client-side evaluation).
    min_train_nodes : int (default: 2)
        Minimum number of nodes sampled for training.
    min_evaluate_nodes : int (default: 2)
        Minimum number of nodes sampled for evaluation.
    min_available_nodes : int (default: 2)
        Minimum number of connected nodes before a round is sampled.
    min_replies : int (default: 1)
        Fewest valid training replies needed to update the global model; with fewer, the
        round keeps the previous global model.
    private_keys : Sequence[str] (default: ())
        State-dict keys that stay on the clients (a private head): never sent to clients,
        never expected back. The rest (the shared body) is averaged.
    aggregator : Optional[Aggregator | str] (default: None)
        How the valid replies' arrays are combined, ``(records, weights) -> ArrayRecord``
        (:mod:`strategies.aggregators`: ``Mean``, ``TrimmedMean``, ``Median``, ``Krum``,
        ``MultiKrum``, on Flower's own code), or a rule name with its default settings
        (``"mean"``, ``"trimmed-mean"``, ``"median"``, ``"krum"``, ``"multikrum"``).
        ``None``: the weighted mean (FedAvg).
    weighting : str (default: "examples")
        Averaging weights: ``"examples"`` (each reply's ``weighted_by_key``, FedAvg) or
        ``"uniform"`` (equal weights, as differential privacy requires). Metrics are
        always weighted by examples.
    participation : Optional[Callable[[int, list[int]], list[int]]] (default: None)
        ``(server_round, connected node ids) -> node ids that may be sampled``: e.g. new
        participants that join at a later round. ``None``: every connected node.
    evaluate_in_train : bool (default: False)
        One message per round: every training message asks the client (config key
        ``evaluate-before-train``) to score, before it trains, what it holds from the
        round before (the received global model and its own models) and to send those
        metrics, prefixed ``eval.``, with its training reply. They are booked as the
        previous round's evaluation (:attr:`RoundLog.evaluated_late`), which is exactly
        what a separate evaluation of that round would have scored for those clients. No
        evaluation message is sent, except after the last round.
    evaluate_every : int (default: 1)
        The clients evaluate the models of every ``evaluate_every``-th round (absolute
        rounds ``k``, ``2k``, ...) and of the last round; the other rounds only train.
        Training is the same either way (evaluation draws no randomness); a protocol that
        reports the final round alone saves the evaluation time of the others.
    node_wait : Optional[float] (default: None)
        Seconds a round waits for enough connected nodes (``min_available_nodes`` and the
        sample size). After that it raises :class:`NodeWaitTimeout` naming how many it
        waited for, instead of waiting forever (a node that died and was not restarted).
        ``None``: wait forever, as Flower's ``sample_nodes``.
    round_offset : int (default: 0)
        Rounds completed before this run (a resumed run): schedules are called with, and
        clients receive as ``round``, ``server_round + round_offset``.
    weighted_by_key : str (default: "num-examples")
        Metric key of the example count used as averaging weight.
    arrayrecord_key : str (default: "arrays")
        Key of the ArrayRecord in messages and replies.
    configrecord_key : str (default: "config")
        Key of the ConfigRecord in messages.
    """

    def __init__(
        self,
        *,
        lr: Schedule = 0.01,
        local_epochs: int = 1,
        batch_size: int = 32,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        min_replies: int = 1,
        private_keys: Sequence[str] = (),
        aggregator: Aggregator | str | None = None,
        weighting: str = "examples",
        participation: Participation | None = None,
        evaluate_in_train: bool = False,
        evaluate_every: int = 1,
        node_wait: float | None = None,
        round_offset: int = 0,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
        )
        if min_replies < 1:
            raise ValueError(f"min_replies must be >= 1, got {min_replies}")
        if round_offset < 0:
            raise ValueError(f"round_offset must be >= 0, got {round_offset}")
        if node_wait is not None and not node_wait > 0:
            raise ValueError(f"node_wait must be > 0 seconds (or None), got {node_wait}")
        if weighting not in ("examples", "uniform"):
            raise ValueError(f"weighting must be 'examples' or 'uniform', got {weighting!r}")
        self.lr = as_schedule("lr", lr)
        self.local_epochs = local_epochs
        self.batch_size = batch_size
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.min_replies = min_replies
        self.private_keys = frozenset(private_keys)
        self.aggregator: Aggregator = as_aggregator(aggregator)
        self.weighting = weighting
        self.participation = participation
        self.evaluate_in_train = evaluate_in_train
        if isinstance(evaluate_every, bool) or not isinstance(evaluate_every, int):
            raise TypeError(f"evaluate_every must be an int >= 1, got {evaluate_every!r}")
        if evaluate_every < 1:
            raise ValueError(f"evaluate_every must be >= 1, got {evaluate_every}")
        self.evaluate_every = evaluate_every
        self.final_round: int | None = None
        self.node_wait = node_wait
        self.round_offset = round_offset
        self.reference_arrays: ArrayRecord | None = None
        self.rounds: dict[int, RoundLog] = {}
        self.node_partitions: dict[int, int] = {}
        """Node id -> partition id, learned from the clients' replies (``partition_id`` in
        their metrics, or ``partition <i>:`` leading an error)."""
        self._warned: set[str] = set()
        self.settings(1)  # validate every value (and a schedule's first one) now
        self.check_lists()

    def check_lists(self) -> None:
        """Validate every value of the per-round lists now (as the round's settings)."""
        lengths = [len(v.values) for v in self.schedules().values() if isinstance(v, PerRound)]
        for server_round in range(2, max(lengths, default=0) - self.round_offset + 1):
            try:
                self.settings(server_round)
            except ValueError as err:
                if "no value for round" not in str(err):  # a shorter list: checked at start
                    raise ValueError(f"round {server_round + self.round_offset}: {err}") from err

    # ------------------------------------------------------------------ what is sent

    def settings(self, server_round: int) -> RoundSettings:
        """The client settings of ``server_round`` (override to add method values)."""
        absolute = server_round + self.round_offset
        return RoundSettings(
            lr=value_at(self.lr, absolute),
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            round=absolute,
        )

    def train_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """The training ConfigRecord of ``server_round``: ``config`` plus the settings."""
        out = ConfigRecord(dict(config))
        out.update(self.settings(server_round).to_config())
        if self.evaluate_in_train and self.fraction_evaluate > 0:  # False: not this round
            out[EVALUATE_BEFORE_TRAIN] = self.evaluates(server_round - 1)
        return out

    def evaluates(self, server_round: int) -> bool:
        """Whether the clients evaluate the models of ``server_round`` (every
        ``evaluate_every``-th absolute round, and the last).
        """
        if server_round + self.round_offset < 1:  # the initial model (a resumed run's
            return False  # round 0 is the round it continues after: its clients score it)
        last = self.final_round is not None and server_round == self.final_round
        return last or (server_round + self.round_offset) % self.evaluate_every == 0

    def schedules(self) -> dict[str, Schedule]:
        """The per-round values this strategy sends (override to add a method's)."""
        return {"lr": self.lr}

    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """Flower's ``Strategy.start``, which also remembers ``num_rounds`` (the round after
        which ``evaluate_in_train`` still sends an evaluation message), checks per-round
        lists against the rounds before round 1, and keeps what is done so far: a run that
        stops early raises with ``err.result`` (a Flower ``Result`` of the rounds before)
        attached (see :func:`run_keeping_result`).
        """
        self.final_round = num_rounds
        self.check_schedules(num_rounds)
        return run_keeping_result(
            self,
            lambda fn: FedAvg.start(
                self,
                grid,
                initial_arrays,
                num_rounds,
                timeout,
                train_config,
                evaluate_config,
                fn,
            ),
            initial_arrays,
            evaluate_fn,
        )

    def score_last_round(
        self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord, timeout: float
    ) -> MetricRecord | None:
        """With ``evaluate_in_train``, a run that stops early (a privacy budget, every
        client refusing) has not had its last trained round scored by the clients: send
        that round's evaluation messages now (``arrays``: its global model) and aggregate
        them into its round log. Returns the aggregated metrics (None: nothing to do).
        """
        trained = [r for r, book in self.rounds.items() if book.train_sent]
        if not self.evaluate_in_train or not trained:
            return None
        server_round = max(trained)
        if self.rounds[server_round].evaluate_metrics:
            return None
        self.final_round = server_round
        messages = self.configure_evaluate(server_round, arrays, config, grid)
        replies = grid.send_and_receive(messages, timeout=timeout)
        return self.aggregate_evaluate(server_round, replies)

    def log_persistent_failures(self) -> None:
        """Name, once, every client that failed in every round it was sampled."""
        for item in self.persistent_failures():
            who = (
                f"partition {item['partition_id']} (node {item['node_id']})"
                if item["partition_id"] is not None
                else f"node {item['node_id']}"
            )
            log(
                WARNING,
                "%s failed in every round it was sampled (%d rounds), always with: %s",
                who,
                len(item["rounds"]),
                item["reason"],
            )

    def check_schedules(self, num_rounds: int) -> None:
        """Refuse, before round 1, a per-round list shorter than the run."""
        for name, schedule in self.schedules().items():
            check_schedule_length(name, schedule, num_rounds + self.round_offset)

    def client_label(self, node_id: int) -> str:
        """``partition <i> (node <id>)`` once the node's partition is known, else
        ``node <id>``.
        """
        pid = self.node_partitions.get(int(node_id))
        return f"node {node_id}" if pid is None else f"partition {pid} (node {node_id})"

    def learn_partitions(self, replies: Iterable[Message]) -> None:
        """Remember the partition id each replying node reports."""
        for msg in replies:
            if msg.has_error() or not msg.content.metric_records:
                continue
            pid = _only_metrics(msg).get("partition_id")
            if isinstance(pid, int | float) and not isinstance(pid, bool):
                self.node_partitions[int(msg.metadata.src_node_id)] = int(pid)

    def client_results(self, server_round: int | None = None) -> dict[int, dict[str, float]]:
        """Every client's evaluation metrics of ``server_round`` (default: the last round
        evaluated), keyed by partition id (node id for a client that reports none), e.g.
        ``{3: {"personal_acc": 0.91, "global_acc": 0.55, "num-examples": 120.0, ...}}``.
        The training metrics of a round are in ``round_log(r).train_clients``, the same way.
        """
        evaluated = [r for r, book in self.rounds.items() if book.clients]
        if server_round is None:
            if not evaluated:
                return {}
            server_round = max(evaluated)
        book = self.rounds.get(server_round)
        return {} if book is None else dict(book.clients)

    def persistent_failures(self) -> list[dict[str, Any]]:
        """The clients whose training failed in every round they were sampled, each time
        with the same reason: ``partition_id``, ``node_id``, ``reason``, ``rounds``.
        """
        sampled: dict[int, list[int]] = {}
        failed: dict[int, list[tuple[int, str]]] = {}
        for r, book in sorted(self.rounds.items()):
            for node in book.sampled:
                sampled.setdefault(node, []).append(r)
            for node, reason in book.failed_nodes.items():
                failed.setdefault(node, []).append((r, reason))
        out = []
        for node, items in sorted(failed.items()):
            reasons = {reason for _, reason in items}
            if len(items) == len(sampled.get(node, [])) and len(reasons) == 1:
                out.append(
                    {
                        "partition_id": self.node_partitions.get(node),
                        "node_id": node,
                        "reason": reasons.pop(),
                        "rounds": [r + self.round_offset for r, _ in items],
                    }
                )
        return out

    def shared(self, arrays: ArrayRecord) -> ArrayRecord:
        """``arrays`` without the private keys (all of them when there are none)."""
        if not self.private_keys:
            return arrays
        return ArrayRecord({k: v for k, v in arrays.items() if k not in self.private_keys})

    def summary(self) -> None:
        """Log what every training message carries, then Flower's FedAvg summary."""
        first = self.settings(1).to_config()
        log(INFO, "\t├──> Sent to clients in each training config (round 1 shown):")
        for key, value in first.items():
            varying = key == "round" or self._is_schedule(key)
            log(INFO, "\t│\t├── %s: %s%s", key, value, " (per round)" if varying else "")
        if self.private_keys:
            log(INFO, "\t│\t└── private (never sent): %s", sorted(self.private_keys))
        log(
            INFO,
            "\t├──> Aggregation: %r, %s",
            self.aggregator,
            weights_used(self.aggregator, self.weighting),
        )
        super().summary()

    def _is_schedule(self, key: str) -> bool:
        return key == "lr" and callable(self.lr)

    # --------------------------------------------------------------------- sampling

    def sample(self, server_round: int, grid: Grid, fraction: float, min_nodes: int) -> list[int]:
        """Node ids for one round: ``fraction`` of the nodes that may take part (see
        ``participation``), at least ``min_nodes`` of them, once ``min_available_nodes``
        are connected (nodes still waiting to join do not count).
        """
        connected = list(grid.get_node_ids())
        view: _NodeView = grid
        if self.participation is None:
            size = max(int(len(connected) * fraction), min_nodes)
            min_available = self.min_available_nodes
        else:
            eligible = self.participation(server_round, connected)
            waiting = len(connected) - len(eligible)
            min_available = max(1, self.min_available_nodes - waiting)
            # a fraction samples a fraction of the joined nodes; the minimum follows them
            at_least = min(min_nodes, max(1, math.ceil(fraction * len(eligible))))
            size = max(int(len(eligible) * fraction), at_least)
            view = _Eligible(grid, self.participation, server_round)
        nodes = self.wait_for_nodes(server_round, view, max(min_available, size))
        return random.sample(nodes, size)  # as Flower's sample_nodes

    def train_sample_size(self, num_nodes: int) -> int:
        """How many of ``num_nodes`` connected nodes a training round samples (every node
        eligible): ``max(int(num_nodes * fraction_train), min_train_nodes)``, as
        :meth:`sample`.
        """
        return max(int(num_nodes * self.fraction_train), self.min_train_nodes)

    def wait_for_nodes(self, server_round: int, view: _NodeView, required: int) -> list[int]:
        """The connected node ids once at least ``required`` are, waiting up to
        ``node_wait`` seconds; raises :class:`NodeWaitTimeout` after that.
        """
        start = time.monotonic()
        last_log: float | None = None
        while len(nodes := list(view.get_node_ids())) < required:
            now = time.monotonic()
            if self.node_wait is not None and now - start >= self.node_wait:
                raise NodeWaitTimeout(
                    f"round {server_round}: waited {self.node_wait:g} s for {required} "
                    f"connected nodes, but only {len(nodes)} are connected. "
                    f"{self.missing_clients(nodes)}The run stops here; the results of the "
                    "rounds before are written. Restart the missing SuperNodes and continue "
                    "with federation.resume_from, or lower federation.min_nodes"
                )
            if last_log is None or now - last_log >= 10:
                log(
                    INFO,
                    "round %d: waiting for nodes: %d connected, %d required%s",
                    server_round,
                    len(nodes),
                    required,
                    f" (up to {self.node_wait:g} s)" if self.node_wait is not None else "",
                )
                last_log = now
            time.sleep(0.5)
        return nodes

    def missing_clients(self, connected: Iterable[int]) -> str:
        """Which clients seen before are not connected now (a sentence, or empty)."""
        connected = set(connected)
        gone = sorted(
            (pid, node) for node, pid in self.node_partitions.items() if node not in connected
        )
        present = {self.node_partitions.get(n) for n in connected}
        missing = [(pid, node) for pid, node in gone if pid not in present]
        if not missing:
            return f"Connected: nodes {sorted(connected)}. "
        names = ", ".join(f"partition {pid} (last seen as node {node})" for pid, node in missing)
        return f"Missing: {names}. "

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the shared global arrays and this round's config to the sampled nodes."""
        arrays = self.shared(arrays)
        self.reference_arrays = arrays
        nodes = self.sample(server_round, grid, self.fraction_train, self.min_train_nodes)
        log(INFO, "configure_train: sampled %d nodes", len(nodes))
        self.warn_once(aggregator_warning(self.aggregator, len(nodes)))
        config = self.train_config(server_round, config)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        messages = list(self._construct_messages(record, nodes, MessageType.TRAIN))
        book = self.round_log(server_round)
        book.train_sent = len(messages)
        book.sent = dict(config)
        book.sampled = [int(n) for n in nodes]
        return messages

    def warn_once(self, message: str | None) -> None:
        """Log ``message`` as a warning the first time it is seen."""
        if message and message not in self._warned:
            self._warned.add(message)
            log(WARNING, "%s", message)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the shared global arrays for client-side evaluation to sampled nodes (with
        ``evaluate_in_train``, after the last round only).
        """
        if self.fraction_evaluate == 0.0 or not self.evaluates(server_round):
            return []
        if self.evaluate_in_train and server_round != self.final_round:
            return []
        nodes = self.sample(server_round, grid, self.fraction_evaluate, self.min_evaluate_nodes)
        log(INFO, "configure_evaluate: sampled %d nodes", len(nodes))
        config = ConfigRecord(dict(config))
        config["server-round"] = server_round
        config["round"] = server_round + self.round_offset
        record = RecordDict(
            {self.arrayrecord_key: self.shared(arrays), self.configrecord_key: config}
        )
        return list(self._construct_messages(record, nodes, MessageType.EVALUATE))

    # ------------------------------------------------------------------ aggregation

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

    def filter_replies(
        self, server_round: int, replies: Iterable[Message], check: Callable[[Message], str | None]
    ) -> tuple[list[Message], list[str]]:
        """Split ``replies`` into the valid ones and the reasons for the rest (each logged
        with the node id).
        """
        valid, dropped = [], []
        for msg in replies:
            problem = check(msg)
            if problem is None:
                valid.append(msg)
                continue
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                pid, problem = describe_error(msg.error.reason)
                if pid is not None:
                    self.node_partitions[node] = pid
                log(
                    DEBUG,
                    "round %d: full error of node %d: %s",
                    server_round,
                    node,
                    msg.error.reason,
                )
                problem = f"client error: {problem}"
            reason = f"{self.client_label(node)}: {problem}"
            dropped.append(reason)
            first = f"{self.client_label(node)}: {problem}" not in self._warned
            self._warned.add(reason)
            log(
                WARNING if first else DEBUG,
                "round %d: dropped the reply of %s%s",
                server_round,
                reason,
                "" if first else " (again)",
            )
        return valid, dropped

    def check_fatal(self, server_round: int, replies: list[Message]) -> None:
        """Raise :class:`ClientsRefused` when every reply of a round is the same kind of
        ClientApp exception (e.g. every node's state-dir holds another architecture): the
        next rounds would fail the same way, so the run stops with the clients' reasons
        instead of repeating empty rounds. Override to keep going.
        """
        raised = (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, ErrorCode.LOAD_CLIENT_APP_EXCEPTION)
        if not replies or not all(m.has_error() and m.error.code in raised for m in replies):
            return
        short = [describe_error(m.error.reason)[1] for m in replies]
        kinds = {reason.split(":", 1)[0] for reason in short}
        if len(kinds) != 1:
            return
        reasons = [
            f"{self.client_label(int(m.metadata.src_node_id))}: {reason}"
            for m, reason in zip(replies, short, strict=True)
        ]
        raise ClientsRefused(
            f"round {server_round}: every sampled client ({len(replies)}) failed with "
            f"{kinds.pop()}; the run stops (the results of the rounds before are written). "
            f"Reasons: {'; '.join(reasons[:3])}{' ...' if len(reasons) > 3 else ''}"
        )

    def aggregate_arrays(self, records: list[ArrayRecord], weights: list[float]) -> ArrayRecord:
        """The replies' arrays combined by ``aggregator`` (override for other rules)."""
        return self.aggregator(records, weights)

    def screen_train_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The valid training replies of ``server_round``, ordered by client (partition
        id, else node id: the float sums of the average then do not depend on the order
        in which replies arrived); the rest is dropped with its reason, counted in the
        round's log, and a fatal round (see :meth:`check_fatal`) raises. Also records every
        accepted reply's update norm.
        """
        replies = list(replies)
        book = self.round_log(server_round)
        self.learn_partitions(replies)
        valid, book.train_dropped = self.filter_replies(
            server_round, replies, self.check_train_reply
        )
        book.failed_nodes = {
            int(m.metadata.src_node_id): describe_error(m.error.reason)[1]
            for m in replies
            if m.has_error()
        }
        book.failed = {
            self.node_partitions.get(node, node): reason
            for node, reason in book.failed_nodes.items()
        }
        valid.sort(key=_client_of)  # arrival order must not change the average's bits
        book.train_replies, book.train_accepted = len(replies), len(valid)
        book.screened = True
        log(
            INFO,
            "aggregate_train: %d replies, %d valid, %d dropped",
            len(replies),
            len(valid),
            len(book.train_dropped),
        )
        if not valid:
            self.check_fatal(server_round, replies)
        elif self.reference_arrays is not None and valid[0].content.array_records:
            book.update_norms = {
                _client_of(m): update_norm(m.content[self.arrayrecord_key], self.reference_arrays)
                for m in valid
            }
        return valid

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Combine the valid replies' arrays with ``aggregator``; drop the rest."""
        replies = list(replies)
        book = self.round_log(server_round)
        valid = replies if book.screened else self.screen_train_replies(server_round, replies)
        if self.evaluate_in_train:  # scores of the round before's models: every reply that
            # has metrics counts (one whose arrays were dropped scored unaffected models)
            scored = [m for m in replies if not m.has_error() and m.content.metric_records]
            self.book_late_evaluation(server_round - 1, scored)
        if not valid:
            log(WARNING, "round %d: no valid reply; the global model stays", server_round)
            return None, None
        metrics = [_train_part(_only_metrics(m)) for m in valid]
        examples = [float(m[self.weighted_by_key]) for m in metrics]  # type: ignore[arg-type]
        weights = examples if self.weighting == "examples" else [1.0] * len(valid)
        book.train_clients = _per_client(valid, metrics)
        if server_round == 1 and self.round_offset == 0:
            self.note_restored_clients(book.train_clients)
        aggregated = weighted_mean_metrics(
            metrics, examples, exclude=(self.weighted_by_key, *IDENTIFIERS)
        )
        aggregated["num_clients"] = len(valid)
        book.train_metrics = dict(aggregated)  # type: ignore[arg-type]
        records = [m.content[self.arrayrecord_key] for m in valid if m.content.array_records]
        if len(valid) < self.min_replies:
            log(
                WARNING,
                "round %d: %d valid replies < min_replies=%d; the global model stays",
                server_round,
                len(valid),
                self.min_replies,
            )
            return None, aggregated
        if not records:
            return None, aggregated
        book.aggregated = True
        return self.aggregate_arrays(records, weights), aggregated

    def note_restored_clients(self, train_clients: dict[int, dict[str, float]]) -> None:
        """In a new run's first round, say which clients continued a personalized model
        that an earlier run left in their durable state folder (so a rerun meant to
        start from scratch is not silently a continuation).
        """
        restored = sorted(
            pid for pid, m in train_clients.items() if m.get("personal_restored_from_disk") == 1.0
        )
        if restored:
            log(
                INFO,
                "round 1: partitions %s continued the personalized models saved in their "
                "state folder by an earlier run (empty the folder, or use another, to start "
                "from new models)",
                restored,
            )

    def book_late_evaluation(self, earlier_round: int, replies: list[Message]) -> None:
        """Book the ``eval.*`` metrics of ``replies`` (scored before training) as the
        evaluation of ``earlier_round``.
        """
        metrics = []
        failed = self.rounds[earlier_round].failed_nodes if earlier_round in self.rounds else {}
        for msg in replies:
            if int(msg.metadata.src_node_id) in failed:  # scored a model it did not train
                continue
            m = _only_metrics(msg)
            part = {k[len(EVAL_PREFIX) :]: v for k, v in m.items() if k.startswith(EVAL_PREFIX)}
            if part.get(self.weighted_by_key, 0) and len(part) > 1:
                part.setdefault("partition_id", m.get("partition_id", msg.metadata.src_node_id))
                metrics.append((msg, MetricRecord(part)))  # type: ignore[arg-type]
        if not metrics:
            return
        book = self.round_log(earlier_round)
        book.evaluated_late = True
        book.evaluate_replies = len(metrics)
        book.clients = _per_client([m for m, _ in metrics], [r for _, r in metrics])
        aggregated = aggregate_evaluate_metrics([r for _, r in metrics], self.weighted_by_key)
        book.evaluate_metrics = dict(aggregated)  # type: ignore[arg-type]

    def check_evaluate_reply(self, msg: Message) -> str | None:
        """Why an evaluation reply cannot be aggregated, or ``None`` if it can."""
        if msg.has_error():
            return f"client error: {msg.error.reason}"
        records = list(msg.content.metric_records.values())
        if len(records) != 1:
            return f"expected one MetricRecord, got {len(records)}"
        weight = records[0].get(self.weighted_by_key)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            return f"'{self.weighted_by_key}' missing or not > 0"
        return None

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Weighted means and the spread (min/max over clients) of the clients' metrics."""
        replies = list(replies)
        book = self.round_log(server_round)
        self.learn_partitions(replies)
        valid, book.evaluate_dropped = self.filter_replies(
            server_round, replies, self.check_evaluate_reply
        )
        book.evaluate_replies = len(replies)
        left_out = [m for m in valid if int(m.metadata.src_node_id) in book.failed_nodes]
        for msg in left_out:
            node = int(msg.metadata.src_node_id)
            log(
                INFO,
                "round %d: the evaluation of %s is left out: its training failed this round",
                server_round,
                self.client_label(node),
            )
        valid = [m for m in valid if m not in left_out]
        if not valid:
            return None
        metrics = [_only_metrics(m) for m in valid]
        book.clients = _per_client(valid, metrics)
        aggregated = aggregate_evaluate_metrics(metrics, self.weighted_by_key)
        book.evaluate_metrics = dict(aggregated)  # type: ignore[arg-type]
        return aggregated


EVALUATE_BEFORE_TRAIN = "evaluate-before-train"
"""Training-config key: score what you hold before training and send it (``eval.*``)."""
EVAL_PREFIX = "eval."
"""Prefix of the evaluation metrics inside a training reply's MetricRecord."""


def _only_metrics(msg: Message) -> MetricRecord:
    return next(iter(msg.content.metric_records.values()))


def _train_part(metrics: MetricRecord) -> MetricRecord:
    """A training reply's metrics without the evaluation scored before training."""
    if not any(k.startswith(EVAL_PREFIX) for k in metrics):
        return metrics
    return MetricRecord({k: v for k, v in metrics.items() if not k.startswith(EVAL_PREFIX)})


def _client_of(msg: Message) -> int:
    """A reply's client: its ``partition_id`` if it reports one, else its node id."""
    metrics = next(iter(msg.content.metric_records.values()), None)
    pid = metrics.get("partition_id") if metrics is not None else None
    return int(pid) if isinstance(pid, int | float) else int(msg.metadata.src_node_id)


def _per_client(replies: list[Message], metrics: list[MetricRecord]) -> dict[int, dict[str, float]]:
    """Numeric metrics by client: its ``partition_id`` if it reports one, else its node id."""
    out = {}
    for msg, m in zip(replies, metrics, strict=True):
        client = int(m.get("partition_id", msg.metadata.src_node_id))  # type: ignore[arg-type]
        out[client] = {
            k: float(v) for k, v in m.items() if isinstance(v, int | float) and k not in IDENTIFIERS
        }
    return out


class RunStopped(RuntimeError):
    """The run stopped before its last round. ``result`` holds what was done before: a
    Flower ``Result`` (the last global arrays, the aggregated training and evaluation
    metrics and the server-side evaluations of the finished rounds), set when the
    exception leaves ``start``.
    """

    result: Result | None = None


class ClientsRefused(RunStopped):
    """Every client of a round failed with the same kind of exception."""


class NodeWaitTimeout(RunStopped):
    """Fewer nodes than a round needs stayed connected for ``node_wait`` seconds."""


EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


def run_keeping_result(
    strategy: RobustFedAvg,
    start: Callable[[EvaluateFn], Result],
    initial_arrays: ArrayRecord,
    evaluate_fn: EvaluateFn | None,
) -> Result:
    """Run ``start`` (Flower's loop, given the evaluation function to use) keeping a copy
    of what is done: the global arrays after every round (Flower passes them to the
    evaluation function) and ``strategy``'s round logs. A :class:`RunStopped` leaving the
    loop gets that partial ``Result`` as ``err.result``.
    """
    partial = Result(arrays=initial_arrays)

    def tracked(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        partial.arrays = arrays
        res = evaluate_fn(server_round, arrays) if evaluate_fn is not None else None
        if res is not None:
            partial.evaluate_metrics_serverapp[server_round] = res
        return res

    def completed(result: Result) -> Result:
        """``result`` with every round's metrics from the round logs (Flower's loop misses
        the evaluations booked one round late, ``evaluate_in_train``).
        """
        for r, book in sorted(strategy.rounds.items()):
            if book.train_metrics:
                result.train_metrics_clientapp[r] = MetricRecord(book.train_metrics)  # type: ignore[arg-type]
            if book.evaluate_metrics:
                result.evaluate_metrics_clientapp[r] = MetricRecord(book.evaluate_metrics)  # type: ignore[arg-type]
        return result

    try:
        return completed(start(tracked))
    except RunStopped as err:
        err.result = completed(partial)
        raise
    finally:
        strategy.log_persistent_failures()


class _NodeView(Protocol):
    """What sampling reads of a Grid."""

    def get_node_ids(self) -> Iterable[int]: ...


class _Eligible:
    """The part of a Grid that Flower's sampling reads (``get_node_ids``), restricted to the
    nodes that may take part in ``server_round`` (asked anew on every call, so that Flower's
    wait for nodes sees nodes that connect meanwhile).
    """

    def __init__(self, grid: Grid, participation: Participation, server_round: int) -> None:
        self._grid = grid
        self._participation = participation
        self._round = server_round

    def get_node_ids(self) -> list[int]:
        return self._participation(self._round, list(self._grid.get_node_ids()))


__all__ = [
    "EVALUATE_BEFORE_TRAIN",
    "EVAL_PREFIX",
    "ClientsRefused",
    "NodeWaitTimeout",
    "Participation",
    "RobustFedAvg",
    "RoundLog",
    "RunStopped",
    "StrategyOptions",
]
