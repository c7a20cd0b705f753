"""Differential privacy of what leaves a client, with Flower's own DP strategy wrappers.

:func:`differential_privacy` wraps any strategy of this project (FML's memes, a baseline's
model) in one of Flower 1.42's wrappers from ``flwr.serverapp.strategy``:

====================  ==========================================================
``server-fixed``      ``DifferentialPrivacyServerSideFixedClipping``
``client-fixed``      ``DifferentialPrivacyClientSideFixedClipping`` + the client's
                      ``flwr.clientapp.mod.fixedclipping_mod``
``server-adaptive``   ``DifferentialPrivacyServerSideAdaptiveClipping``
``client-adaptive``   ``DifferentialPrivacyClientSideAdaptiveClipping`` + the client's
                      ``flwr.clientapp.mod.adaptiveclipping_mod``
====================  ==========================================================

Flower clips each update (reply minus the arrays sent) to an L2 norm ``C`` and adds
Gaussian noise of standard deviation ``z * C / n`` to the average of the ``n`` sampled
clients' updates. What this module adds around Flower's wrappers, and why:

- **Replies are checked before they are clipped.** Flower clips every reply positionally
  against the arrays sent; a reply with other keys, shapes or NaN would crash the
  ServerApp or be averaged. The inner strategy's checks run first
  (:meth:`~strategies.robust.RobustFedAvg.screen_train_replies`), and the valid replies'
  arrays are put in the order they were sent.
- **Only what was sent is clipped.** Private keys (FedPer's head, FML's private meme
  part) are neither sent nor clipped nor noised; the personalized model never leaves the
  client at all.
- **Accounting.** Flower's accountant option (``accountant=``) accepts only a strategy
  whose ``aggregate_train`` *is* ``FedAvg.aggregate_train``, which ours (with reply
  validation) is not. Its conditions are met here instead, and Flower's own
  ``RdpAccountant`` (Google's ``dp-accounting``, RDP) composes one Gaussian event per
  released round: uniform averaging weights (the inner strategy must use
  ``weighting="uniform"``), exactly ``num_sampled_clients`` valid contributions (a round
  with fewer releases nothing: the global model stays and no budget is spent), and
  ``no-amplification`` sampling (no credit is taken for sampling clients, a conservative
  bound), add-or-remove-one-client neighbours (client-level DP). Metrics that clients
  report are not covered (as in Flower).
- **Adaptive clipping.** Flower 1.42's adaptive wrappers update the clipping norm *before*
  they add noise, so the noise would be calibrated to the new norm rather than to the
  one the updates were clipped with; :meth:`_add_noise_to_aggregated_arrays` is
  overridden to use the latter. The accounted noise multiplier is the configured ``z``:
  Flower splits it between the update and the clipped-count query as Andrew et al.
  (2021) do, so the pair composes to one Gaussian mechanism of multiplier ``z``.
- **A budget.** With ``max_epsilon``, a round whose release would exceed it is not
  started: the wrapper's ``start`` ends there and *returns* the ``Result`` of the rounds
  before (``wrapper.stopped`` says why, ``wrapper.epsilon()`` what was spent). Inside,
  :class:`BudgetExhausted` (a Flower ``PrivacyBudgetExhausted``) leaves
  ``configure_train``. A run that fails (every client refusing, a node gone) raises with
  the partial ``Result`` attached (:class:`strategies.robust.RunStopped`).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import (
    GaussianPrivacyEvent,
    Grid,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Result,
    Strategy,
)

from strategies.aggregators import Mean
from strategies.robust import EvaluateFn, RobustFedAvg, RunStopped, run_keeping_result


class BudgetExhausted(RunStopped, PrivacyBudgetExhausted):
    """The next round's release would exceed ``max_epsilon``: the run ends before it."""


MODES = ("server-fixed", "client-fixed", "server-adaptive", "client-adaptive")


class _Private:
    """What every wrapper of this module adds to Flower's (placed before it in the MRO)."""

    strategy: RobustFedAvg
    num_sampled_clients: int
    clipping_norm: float

    def _setup(
        self,
        strategy: RobustFedAvg,
        noise_multiplier: float,
        population_size: int,
        delta: float,
        max_epsilon: float | None,
        prior_releases: int,
        noise_seed: int | None = None,
    ) -> None:
        if not isinstance(strategy, RobustFedAvg):
            raise TypeError("differential privacy wraps a RobustFedAvg (any strategy here)")
        if not isinstance(strategy.aggregator, Mean):
            raise ValueError(
                f"differential privacy with aggregator={strategy.aggregator!r}: the noise and "
                "the accountant are calibrated to the mean of the clipped updates; a robust "
                "rule has another sensitivity, and the epsilon reported would not hold. Use "
                "the mean (aggregator=None) with DP"
            )
        if strategy.weighting != "uniform":
            raise ValueError(
                "differential privacy needs uniform averaging weights (the noise is "
                "calibrated to them): build the strategy with weighting='uniform'"
            )
        if population_size < self.num_sampled_clients:
            raise ValueError(
                f"population_size={population_size} < num_sampled_clients="
                f"{self.num_sampled_clients}"
            )
        if max_epsilon is not None and noise_multiplier <= 0:
            raise ValueError("a privacy budget needs noise_multiplier > 0")
        self.accounted_noise_multiplier = noise_multiplier
        self.population_size = population_size
        self.delta = delta
        self.max_epsilon = max_epsilon
        self.privacy_accountant = None
        if noise_multiplier > 0:
            from flwr.serverapp import RdpAccountant  # needs flwr[dp] (dp-accounting)

            self.privacy_accountant = RdpAccountant(
                PrivacyConfig(
                    target_delta=delta,
                    population_size=population_size,
                    neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                    sampling_method=SamplingMethod.NO_AMPLIFICATION,
                )
            )
            if prior_releases:
                self.privacy_accountant.compose(self.event(), count=prior_releases)
        elif prior_releases < 0:
            raise ValueError("prior_releases must be >= 0")
        self._clipped_with: float | None = None
        self.noise_seed = noise_seed
        self.stopped: str | None = None
        """Why the last ``start`` ended before its last round (the privacy budget), or None."""

    def start(  # type: ignore[no-untyped-def]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """Flower's ``Strategy.start`` on this wrapper. When the budget stops the run, it
        returns the ``Result`` of the rounds before and sets :attr:`stopped`; a run that
        fails raises with ``err.result`` attached (see
        :func:`strategies.robust.run_keeping_result`).
        """
        inner = self.strategy
        inner.final_round = num_rounds
        inner.check_schedules(num_rounds)
        self.stopped = None

        def loop(fn: EvaluateFn) -> Result:
            return Strategy.start(
                self,  # type: ignore[arg-type]
                grid,
                initial_arrays,
                num_rounds,
                timeout,
                train_config,
                evaluate_config,
                fn,
            )

        try:
            return run_keeping_result(inner, loop, initial_arrays, evaluate_fn)
        except BudgetExhausted as err:
            self.stopped = f"privacy budget exhausted: {err}"
            log(INFO, "The run stops before its next round: %s", self.stopped)
            result = err.result
            assert result is not None
            config = ConfigRecord(dict(evaluate_config or {}))
            scored = inner.score_last_round(grid, result.arrays, config, timeout)
            if scored is not None:  # the last trained round, scored by the clients now
                last = max(r for r, book in inner.rounds.items() if book.train_sent)
                result.evaluate_metrics_clientapp[last] = scored
            return result

    def client_results(self, server_round: int | None = None) -> dict[int, dict[str, float]]:
        """The wrapped strategy's per-client results (see ``RobustFedAvg.client_results``)."""
        return self.strategy.client_results(server_round)

    def round_log(self, server_round: int):  # type: ignore[no-untyped-def]
        """The wrapped strategy's round log (see ``RobustFedAvg.round_log``)."""
        return self.strategy.round_log(server_round)

    def persistent_failures(self) -> list[dict[str, Any]]:
        """The wrapped strategy's clients that failed in every round they were sampled."""
        return self.strategy.persistent_failures()

    # ------------------------------------------------------------------ accounting

    def event(self) -> GaussianPrivacyEvent:
        """The privacy event of one released round."""
        return GaussianPrivacyEvent(
            noise_multiplier=self.accounted_noise_multiplier,
            sample_size=self.num_sampled_clients,
            population_size=self.population_size,
        )

    def epsilon(self) -> float | None:
        """Epsilon spent so far at ``delta`` (``None`` without noise: not private)."""
        if self.privacy_accountant is None:
            return None
        return self.privacy_accountant.get_privacy_spent().epsilon

    @property
    def releases(self) -> int:
        """Rounds whose aggregate was released (and accounted)."""
        acc = self.privacy_accountant
        return acc.num_releases if acc is not None else self._releases_without_noise

    _releases_without_noise = 0

    # ------------------------------------------------------------------ the round

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Refuse a round that would exceed the budget, then Flower's configure_train."""
        acc = self.privacy_accountant
        if acc is not None and self.max_epsilon is not None:
            if acc.would_exceed(self.event(), max_epsilon=self.max_epsilon):
                raise BudgetExhausted(
                    f"round {server_round + self.strategy.round_offset}: its release would "
                    f"exceed max_epsilon={self.max_epsilon:g} (spent so far: epsilon "
                    f"{self.epsilon():.4f} at delta {self.delta:g} after {acc.num_releases} "
                    "rounds)"
                )
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        if len(messages) != self.num_sampled_clients:
            raise ValueError(
                f"round {server_round}: {len(messages)} clients sampled, but the noise is "
                f"calibrated to num_sampled_clients={self.num_sampled_clients}"
            )
        if hasattr(self, "current_arrays"):  # server-side clipping: against what was sent
            self.current_arrays = self.strategy.reference_arrays
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check the replies, release only a full cohort, then Flower's clip/average/noise."""
        inner = self.strategy
        valid = inner.screen_train_replies(server_round, replies)
        book = inner.round_log(server_round)
        valid = self._drop_zero_updates(server_round, valid)
        if len(valid) != self.num_sampled_clients:
            log(
                WARNING,
                "round %d: %d valid replies of %d sampled; the noise is calibrated to "
                "exactly %d, so nothing is released this round (the global model stays, "
                "no privacy budget is spent)",
                server_round,
                len(valid),
                self.num_sampled_clients,
                self.num_sampled_clients,
            )
            book.privacy = self._record(released=False)
            if not valid:
                return None, None
            _, metrics = inner.aggregate_train(server_round, valid)  # the clients' metrics
            book.aggregated = False
            return None, metrics
        reference = inner.reference_arrays
        assert reference is not None  # configure_train ran
        for msg in valid:  # Flower clips positionally: the order in which they were sent
            sent = msg.content[inner.arrayrecord_key]
            msg.content[inner.arrayrecord_key] = ArrayRecord({k: sent[k] for k in reference})
        self._clipped_with = self.clipping_norm
        if self.noise_seed is not None:  # Flower draws the noise from NumPy's global generator
            np.random.seed([self.noise_seed, server_round + inner.round_offset])
        arrays, metrics = super().aggregate_train(server_round, valid)  # type: ignore[misc]
        released = arrays is not None
        if released:
            if self.privacy_accountant is not None:
                self.privacy_accountant.compose(self.event())
            else:
                self._releases_without_noise += 1
        book.privacy = self._record(released=released)
        log(
            INFO,
            "round %d: privacy: %s, epsilon %s at delta %g",
            server_round,
            "released" if released else "not released",
            "inf (no noise)" if self.epsilon() is None else f"{self.epsilon():.4f}",
            self.delta,
        )
        return arrays, metrics

    def _drop_zero_updates(self, server_round: int, valid: list[Message]) -> list[Message]:
        """Refuse replies equal to the arrays sent: Flower 1.42's clipping divides by the
        update's norm (``flwr/supercore/differential_privacy.py``, ``clip_inputs_inplace``)
        and would raise ``ZeroDivisionError`` in the ServerApp (on a client, its mod fails
        the same way and the reply arrives as an error).
        """
        inner = self.strategy
        reference = inner.reference_arrays
        if reference is None:
            return valid
        book = inner.round_log(server_round)
        kept = []
        for msg in valid:
            arrays = msg.content[inner.arrayrecord_key]
            if all(np.array_equal(arrays[k].numpy(), ref.numpy()) for k, ref in reference.items()):
                reason = (
                    f"node {msg.metadata.src_node_id}: its update is exactly zero (no training "
                    "step?), which Flower's DP clipping cannot take"
                )
                log(WARNING, "round %d: dropped the reply of %s", server_round, reason)
                book.train_dropped.append(reason)
                book.train_accepted -= 1
            else:
                kept.append(msg)
        return kept

    def _record(self, released: bool) -> dict[str, float | None]:
        return {
            "privacy_released": float(released),
            "privacy_epsilon": self.epsilon(),
            "privacy_delta": self.delta,
            "privacy_releases": float(self.releases),
            "noise_multiplier": self.accounted_noise_multiplier,
            "clipping_norm": self._clipped_with if self._clipped_with else self.clipping_norm,
        }


class _AdaptiveNoise:
    """Noise calibrated to the norm the updates were clipped with (see the module)."""

    clipping_norm: float
    _clipped_with: float | None

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        updated = self.clipping_norm
        if self._clipped_with is not None:
            self.clipping_norm = self._clipped_with
        try:
            return super()._add_noise_to_aggregated_arrays(aggregated)  # type: ignore[misc]
        finally:
            self.clipping_norm = updated


class ServerSideFixedClipping(_Private, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, on checked replies, accounted."""


class ClientSideFixedClipping(_Private, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping (clients use ``fixedclipping_mod``), accounted."""


class ServerSideAdaptiveClipping(
    _Private, _AdaptiveNoise, DifferentialPrivacyServerSideAdaptiveClipping
):
    """Flower's server-side adaptive clipping, on checked replies, accounted."""


class ClientSideAdaptiveClipping(
    _Private, _AdaptiveNoise, DifferentialPrivacyClientSideAdaptiveClipping
):
    """Flower's client-side adaptive clipping (clients use ``adaptiveclipping_mod``),
    accounted.
    """


def differential_privacy(
    strategy: RobustFedAvg,
    *,
    mode: str,
    noise_multiplier: float,
    clipping_norm: float,
    num_sampled_clients: int,
    population_size: int | None = None,
    delta: float = 1e-5,
    max_epsilon: float | None = None,
    target_quantile: float = 0.5,
    clip_norm_lr: float = 0.2,
    clipped_count_stddev: float | None = None,
    prior_releases: int = 0,
    noise_seed: int | None = None,
) -> Strategy:
    """``strategy`` wrapped in Flower's DP wrapper for ``mode``, with accounting.

    Parameters
    ----------
    strategy : RobustFedAvg
        Any strategy of this project built with ``weighting="uniform"``.
    mode : str
        ``server-fixed``, ``client-fixed``, ``server-adaptive`` or ``client-adaptive``
        (the client modes need Flower's ``fixedclipping_mod`` / ``adaptiveclipping_mod`` on
        the ClientApp's train handler; the project's ClientApp adds them by itself).
    noise_multiplier : float
        ``z``: the noise on the average has standard deviation ``z * C / n``. 0 clips
        without noise (not private: epsilon is reported as ``None``).
    clipping_norm : float
        ``C``, the L2 bound of one update; the initial bound for the adaptive modes.
    num_sampled_clients : int
        ``n``, the clients sampled every round (the strategy's sample size).
    population_size : Optional[int] (default: None)
        Clients in the federation (``None``: ``num_sampled_clients``).
    delta : float (default: 1e-5)
        The delta at which epsilon is reported.
    max_epsilon : Optional[float] (default: None)
        A budget: a round whose release would exceed it is not started; ``start`` returns
        the ``Result`` of the rounds before, and the wrapper's ``stopped`` says why.
    target_quantile, clip_norm_lr, clipped_count_stddev
        Adaptive modes: Flower's ``target_clipped_quantile``, ``clip_norm_lr`` and
        ``clipped_count_stddev`` (``None``: ``num_sampled_clients / 20``).
    prior_releases : int (default: 0)
        Rounds released before (a resumed run): composed into the accountant first.
    noise_seed : Optional[int] (default: None)
        Seed the noise (per round), for reproducible experiments. Never in a deployment
        meant to protect anyone: noise drawn from a known seed can be subtracted. None:
        fresh noise (NumPy's global generator, as Flower draws it).

    Raises
    ------
    ValueError
        A strategy that does not average uniformly, or averages with a robust rule (the
        noise is calibrated to the plain mean of the clipped updates).
    """
    population = population_size if population_size is not None else num_sampled_clients
    wrapper: _Private
    if mode in ("server-fixed", "client-fixed"):
        cls = ServerSideFixedClipping if mode == "server-fixed" else ClientSideFixedClipping
        wrapper = cls(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
    elif mode in ("server-adaptive", "client-adaptive"):
        adaptive = {"server-adaptive": ServerSideAdaptiveClipping}
        cls_a = adaptive.get(mode, ClientSideAdaptiveClipping)
        wrapper = cls_a(
            strategy,
            noise_multiplier,
            num_sampled_clients,
            initial_clipping_norm=clipping_norm,
            target_clipped_quantile=target_quantile,
            clip_norm_lr=clip_norm_lr,
            clipped_count_stddev=clipped_count_stddev,
        )
    else:
        raise ValueError(f"unknown privacy mode '{mode}'; one of {list(MODES)}")
    wrapper._setup(
        strategy, noise_multiplier, population, delta, max_epsilon, prior_releases, noise_seed
    )
    return wrapper  # type: ignore[return-value]


__all__ = [
    "MODES",
    "BudgetExhausted",
    "ClientSideAdaptiveClipping",
    "ClientSideFixedClipping",
    "ServerSideAdaptiveClipping",
    "ServerSideFixedClipping",
    "differential_privacy",
]
