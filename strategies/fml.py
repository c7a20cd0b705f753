"""Federated Mutual Learning strategy (Shen et al. 2020) for Flower's Message API."""

from __future__ import annotations

from logging import INFO

from flwr.app import ConfigRecord
from flwr.common.logger import log

from strategies.robust import RobustFedAvg, RoundConfigFn


class FedMutualLearning(RobustFedAvg):
    """Federated Mutual Learning strategy.

    Implementation based on https://arxiv.org/abs/2006.16765

    Every sampled client receives the global model, copies it into its *meme* model,
    trains meme and its private *personalized* model together by deep mutual learning,
    and replies with the meme's arrays only (parameters and buffers) plus a MetricRecord
    holding ``num-examples``. The strategy averages the memes weighted by examples
    (FedAvg) into the next global model, dropping malformed replies with a logged reason
    (see :class:`~strategies.robust.RobustFedAvg`).

    The training ConfigRecord carries ``alpha`` and ``beta`` (the weights of the labels in
    the personalized and meme losses) and ``server-round``; ``round_config_fn`` may add
    or replace per-round values (learning rate, a dynamic alpha/beta schedule).

    Parameters
    ----------
    alpha : float (default: 0.5)
        Weight of the cross-entropy in the personalized model's loss; ``1 - alpha``
        weights the KL divergence to the meme's predictions.
    beta : float (default: 0.5)
        Weight of the cross-entropy in the meme model's loss; ``1 - beta`` weights the
        KL divergence to the personalized model's predictions.
    round_config_fn : Optional[callable] (default: None)
        ``server_round -> dict`` merged into each round's training ConfigRecord
        (after ``alpha``/``beta``, so it may override them).
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (``fraction_train``,
        ``min_available_nodes``, ``weighted_by_key``, ...).
    """

    def __init__(
        self,
        alpha: float = 0.5,
        beta: float = 0.5,
        round_config_fn: RoundConfigFn | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(round_config_fn=round_config_fn, **kwargs)
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.alpha = alpha
        self.beta = beta

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> Mutual learning: alpha %.2f | beta %.2f", self.alpha, self.beta)
        super().summary()

    def train_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """``alpha``, ``beta``, then the values of ``round_config_fn``."""
        base = ConfigRecord(dict(config))
        base["alpha"] = self.alpha
        base["beta"] = self.beta
        return super().train_config(server_round, base)
