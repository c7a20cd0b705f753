"""Federated Mutual Learning strategy (Shen et al. 2020) for Flower's Message API."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from logging import INFO

from flwr.common.logger import log

from fml_flower.settings import DISTILLATIONS, RoundSettings, Schedule, as_schedule, value_at
from strategies.aggregators import Aggregator
from strategies.robust import Participation, RobustFedAvg


class FedMutualLearning(RobustFedAvg):
    """Federated Mutual Learning strategy.

    Implementation based on https://arxiv.org/abs/2006.16765

    Every sampled client receives the global model, copies it into its *meme* model (with
    a fresh optimizer), trains meme and its private *personalized* model together by deep
    mutual learning, and replies with the meme's arrays only (parameters and buffers) plus
    a MetricRecord holding ``num-examples``. The strategy averages the memes weighted by
    examples (FedAvg, or another ``aggregator``) into the next global model, dropping
    malformed replies with a logged reason (see :class:`~strategies.robust.RobustFedAvg`).
    Wrap it in :func:`strategies.privacy.differential_privacy` to clip and noise the memes.

    The constructor is the single source of truth for what clients train with: every
    training ConfigRecord carries ``lr``, ``local-epochs``, ``batch-size``, ``momentum``,
    ``weight-decay``, ``alpha``, ``beta``, ``distillation``, ``round`` and ``server-round``
    (:data:`fml_flower.settings.CONFIG_KEYS`). :func:`client_app.fml.train` reads exactly
    these.

    Parameters
    ----------
    alpha : float | Callable[[int], float] | Sequence[float] (default: 0.5)
        Weight of the cross-entropy in the personalized model's loss; ``1 - alpha``
        weights the KL divergence to the meme's predictions. A constant in [0, 1], a
        function of the round (1-based) returning one, or a list with one value per round
        (checked against the number of rounds when the run starts).
    beta : float | Callable[[int], float] | Sequence[float] (default: 0.5)
        Weight of the cross-entropy in the meme's loss; ``1 - beta`` weights the KL
        divergence to the personalized model's predictions (e.g. ``lambda r: 0.1 if r <=
        10 else 0.5`` for the authors' dynamic balancing).
    distillation : str (default: "faithful")
        The mutual-learning loss the clients use: ``"faithful"`` (the paper and the
        authors' code: KL summed over classes, averaged over the batch, the partner
        detached) or ``"pfllib"`` (PFLlib's ``clientFML``: KL averaged over classes too,
        the partner not detached, gradient norms clipped at 10, the last incomplete batch
        dropped; its server averages memes uniformly, which ``weighting=None`` follows).
    lr : float | Callable[[int], float] | Sequence[float] (default: 0.01)
        SGD learning rate of both models: a constant, a function of the round or one value
        per round.
    local_epochs : int (default: 1)
        Epochs of mutual learning per round.
    batch_size : int (default: 32)
        Mini-batch size on the clients.
    momentum : float (default: 0.0)
        SGD momentum of both models (the meme's optimizer is new every round).
    weight_decay : float (default: 0.0)
        SGD weight decay of both models.
    fraction_train : float (default: 1.0)
        Fraction of nodes sampled for training.
    fraction_evaluate : float (default: 1.0)
        Fraction of nodes sampled for evaluation.
    min_train_nodes : int (default: 2)
        Minimum number of nodes sampled for training.
    min_evaluate_nodes : int (default: 2)
        Minimum number of nodes sampled for evaluation.
    min_available_nodes : int (default: 2)
        Minimum number of connected nodes before a round starts.
    min_replies : int (default: 1)
        Fewest valid replies that update the global model.
    private_keys : Sequence[str] (default: ())
        Meme state-dict keys that stay on the clients (a task-specific head): never sent,
        never averaged.
    aggregator : Optional[Aggregator | str] (default: None)
        How the memes are combined: ``None`` is the weighted mean (FedAvg); a robust rule
        from :mod:`strategies.aggregators` (``TrimmedMean(0.2)``, ``Median()``,
        ``Krum(1)``, ``MultiKrum(1, 3)``) bounds what one poisoned meme can do; a rule name
        (``"median"``, ``"trimmed-mean"``, ...) takes that rule's default settings.
    weighting : Optional[str] (default: None)
        ``"examples"`` or ``"uniform"`` averaging weights (differential privacy needs
        uniform ones; see :func:`strategies.privacy.differential_privacy`). ``None``:
        ``"examples"``, or ``"uniform"`` with ``distillation="pfllib"`` (as PFLlib).
    participation : Optional[Callable[[int, list[int]], list[int]]] (default: None)
        ``(server_round, connected node ids) -> node ids that may be sampled``.
    evaluate_in_train : bool (default: False)
        One message per round: clients score the received global model and their
        personalized model before training and send the scores with the training reply;
        they are booked as the previous round's evaluation, and only the last round gets
        an evaluation message (:func:`client_app.fml.train` then needs ``test=``).
    evaluate_every : int (default: 1)
        Evaluate the models of every ``evaluate_every``-th round and of the last one.
    node_wait : Optional[float] (default: None)
        Seconds a round waits for enough connected nodes before it raises
        ``NodeWaitTimeout``; ``None`` waits forever (Flower's behaviour).
    round_offset : int (default: 0)
        Rounds done before this run (a resumed run); schedules continue from there.
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
        alpha: Schedule = 0.5,
        beta: Schedule = 0.5,
        distillation: str = "faithful",
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
        weighting: str | None = None,
        participation: Participation | None = None,
        evaluate_in_train: bool = False,
        evaluate_every: int = 1,
        node_wait: float | None = None,
        round_offset: int = 0,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
    ) -> None:
        if distillation not in DISTILLATIONS:
            raise ValueError(f"distillation must be one of {DISTILLATIONS}, got {distillation!r}")
        self.alpha = as_schedule("alpha", alpha)
        self.beta = as_schedule("beta", beta)
        self.distillation = distillation
        if weighting is None:
            weighting = "uniform" if distillation == "pfllib" else "examples"
        super().__init__(
            lr=lr,
            local_epochs=local_epochs,
            batch_size=batch_size,
            momentum=momentum,
            weight_decay=weight_decay,
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            min_replies=min_replies,
            private_keys=private_keys,
            aggregator=aggregator,
            weighting=weighting,
            participation=participation,
            evaluate_in_train=evaluate_in_train,
            evaluate_every=evaluate_every,
            node_wait=node_wait,
            round_offset=round_offset,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
        )

    def settings(self, server_round: int) -> RoundSettings:
        """The base settings plus this round's ``alpha`` and ``beta``."""
        base = super().settings(server_round)
        return replace(
            base,
            alpha=value_at(self.alpha, base.round),
            beta=value_at(self.beta, base.round),
            distillation=self.distillation,
        )

    def schedules(self) -> dict[str, Schedule]:
        """``lr``, ``alpha`` and ``beta``."""
        return {**super().schedules(), "alpha": self.alpha, "beta": self.beta}

    def summary(self) -> None:
        """Log the mutual-learning weights, then what every message carries."""
        log(INFO, "\t├──> Federated Mutual Learning: only the meme is averaged")
        super().summary()

    def _is_schedule(self, key: str) -> bool:
        schedules = {"alpha": self.alpha, "beta": self.beta}
        return callable(schedules.get(key)) or super()._is_schedule(key)
