"""Baselines run under the same data, models and evaluation as FML.

- :class:`FedAvgBaseline`: plain FedAvg (McMahan et al. 2017), the global model only.
- :class:`FedProx`: FedAvg with a proximal term ``mu/2 ||w - w_global||^2`` on clients
  (Li et al. 2020); the strategy sends ``proximal-mu``.
- :class:`Ditto`: a global model by FedAvg plus a personal model per client regularized
  towards it by ``lambda/2 ||v - w_global||^2`` (Li et al. 2021); sends ``ditto-lambda``.
- :class:`FedPer`: a shared body averaged by FedAvg, a private head per client that never
  leaves it (Arivazhagan et al. 2019).
- :class:`LocalOnly`: every client trains its own model, no model is communicated.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from strategies.robust import RobustFedAvg, RoundConfigFn


class FedAvgBaseline(RobustFedAvg):
    """FedAvg: clients train the global model by cross-entropy; the server averages it."""


class FedProx(RobustFedAvg):
    """FedProx: FedAvg whose clients add ``mu/2 ||w - w_global||^2`` to their loss.

    Parameters
    ----------
    proximal_mu : float
        Weight of the proximal term, sent to clients as ``proximal-mu``.
    """

    def __init__(
        self, proximal_mu: float, round_config_fn: RoundConfigFn | None = None, **kwargs: object
    ) -> None:
        super().__init__(round_config_fn=round_config_fn, **kwargs)
        if proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
        self.proximal_mu = proximal_mu

    def train_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """Add ``proximal-mu``."""
        out = super().train_config(server_round, config)
        out["proximal-mu"] = self.proximal_mu
        return out


class Ditto(RobustFedAvg):
    """Ditto: FedAvg of the global model plus a regularized personal model per client.

    Parameters
    ----------
    ditto_lambda : float
        Weight of ``lambda/2 ||v - w_global||^2`` in the personal model's loss, sent to
        clients as ``ditto-lambda``.
    """

    def __init__(
        self, ditto_lambda: float, round_config_fn: RoundConfigFn | None = None, **kwargs: object
    ) -> None:
        super().__init__(round_config_fn=round_config_fn, **kwargs)
        if ditto_lambda < 0:
            raise ValueError(f"ditto_lambda must be >= 0, got {ditto_lambda}")
        self.ditto_lambda = ditto_lambda

    def train_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """Add ``ditto-lambda``."""
        out = super().train_config(server_round, config)
        out["ditto-lambda"] = self.ditto_lambda
        return out


class FedPer(RobustFedAvg):
    """FedPer: only the body is averaged; the arrays named in ``private_keys`` (the head)
    are never sent, neither to nor from clients.

    Parameters
    ----------
    private_keys : Sequence[str]
        State-dict keys of the private head (e.g. the last linear layer's weight/bias).
    """

    def __init__(
        self,
        private_keys: Sequence[str],
        round_config_fn: RoundConfigFn | None = None,
        **kwargs: object,
    ) -> None:
        if not private_keys:
            raise ValueError("FedPer needs the keys of the private head")
        super().__init__(round_config_fn=round_config_fn, private_keys=private_keys, **kwargs)


class LocalOnly(RobustFedAvg):
    """Local training only: messages carry an empty ArrayRecord and replies carry none.

    The server still drives the rounds (so every method is measured on the same schedule)
    and aggregates the clients' metrics, but no model crosses the network.
    """

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the round's config with an empty ArrayRecord."""
        return super().configure_train(server_round, ArrayRecord(), config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send an empty ArrayRecord."""
        return super().configure_evaluate(server_round, ArrayRecord(), config, grid)

    def check_train_reply(self, msg: Message) -> str | None:
        """A reply must carry metrics with ``num-examples`` and no arrays at all."""
        if msg.has_error():
            return f"client error: {msg.error.reason}"
        if msg.content.array_records:
            return "a local-only client must not send arrays"
        metrics = list(msg.content.metric_records.values())
        if len(metrics) != 1 or not isinstance(metrics[0].get(self.weighted_by_key), int | float):
            return f"expected one MetricRecord with '{self.weighted_by_key}'"
        return None
