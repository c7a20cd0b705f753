"""Baselines run under the same data, models and evaluation as FML.

- :class:`FedAvgBaseline`: plain FedAvg (McMahan et al. 2017), the global model only.
- :class:`FedProx`: FedAvg with a proximal term ``mu/2 ||w - w_global||^2`` on clients
  (Li et al. 2020); the strategy sends ``proximal-mu``.
- :class:`Ditto`: a global model by FedAvg plus a personal model per client regularized
  towards it by ``lambda/2 ||v - w_global||^2`` (Li et al. 2021); sends ``ditto-lambda``.
- :class:`FedPer`: a shared body averaged by FedAvg, a private head per client that never
  leaves it (Arivazhagan et al. 2019; FedRep, Collins et al. 2021, uses it too).
- :class:`LocalOnly`: every client trains its own model, no model is communicated.

Each takes :class:`~strategies.robust.RobustFedAvg`'s keyword parameters
(:class:`~strategies.robust.StrategyOptions`) plus its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Unpack

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fml_flower.settings import RoundSettings, check_range
from strategies.robust import RobustFedAvg, StrategyOptions


class FedAvgBaseline(RobustFedAvg):
    """FedAvg: clients train the global model by cross-entropy; the server averages it."""


def _with_extra(settings: RoundSettings, **extra: float) -> RoundSettings:
    return replace(settings, extra={**settings.extra, **extra})


class FedProx(RobustFedAvg):
    """FedProx: FedAvg whose clients add ``mu/2 ||w - w_global||^2`` to their loss.

    Parameters
    ----------
    proximal_mu : float (default: 0.01)
        Weight of the proximal term, sent to clients as ``proximal-mu``.
    **options
        :class:`~strategies.robust.RobustFedAvg`'s keyword parameters.
    """

    def __init__(self, *, proximal_mu: float = 0.01, **options: Unpack[StrategyOptions]) -> None:
        self.proximal_mu = check_range("proximal_mu", proximal_mu, 0.0)
        super().__init__(**options)

    def settings(self, server_round: int) -> RoundSettings:
        """Add ``proximal-mu``."""
        return _with_extra(super().settings(server_round), **{"proximal-mu": self.proximal_mu})


class Ditto(RobustFedAvg):
    """Ditto: FedAvg of the global model plus a regularized personal model per client.

    Parameters
    ----------
    ditto_lambda : float (default: 0.1)
        Weight of ``lambda/2 ||v - w_global||^2`` in the personal model's loss, sent to
        clients as ``ditto-lambda``.
    **options
        :class:`~strategies.robust.RobustFedAvg`'s keyword parameters.
    """

    def __init__(self, *, ditto_lambda: float = 0.1, **options: Unpack[StrategyOptions]) -> None:
        self.ditto_lambda = check_range("ditto_lambda", ditto_lambda, 0.0)
        super().__init__(**options)

    def settings(self, server_round: int) -> RoundSettings:
        """Add ``ditto-lambda``."""
        return _with_extra(super().settings(server_round), **{"ditto-lambda": self.ditto_lambda})


class FedPer(RobustFedAvg):
    """FedPer (and FedRep): only the body is averaged; the arrays named in
    ``private_keys`` (the head) are never sent, neither to nor from clients.

    Parameters
    ----------
    private_keys : Sequence[str]
        State-dict keys of the private head (e.g. the last linear layer's weight/bias).
    **options
        :class:`~strategies.robust.RobustFedAvg`'s other keyword parameters.
    """

    def __init__(self, *, private_keys: Sequence[str], **options: Unpack[StrategyOptions]) -> None:
        if not private_keys:
            raise ValueError("FedPer needs the keys of the private head")
        super().__init__(private_keys=private_keys, **options)


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
        return self.check_evaluate_reply(msg)
