"""How a strategy combines the clients' arrays: the mean, or one of Flower's robust rules.

An aggregator is a callable ``(records, weights) -> ArrayRecord`` over ArrayRecords that
passed the strategy's reply checks (same keys, shapes and dtypes, finite values). Give one
to any strategy of this project (``FedMutualLearning(aggregator=TrimmedMean(0.1))``): the
meme-only contract and the reply validation stay the strategy's, the rule is the
aggregator's.

The robust rules use Flower 1.42's own code: ``trim_mean`` of
``flwr.serverapp.strategy.fedtrimmedavg`` (what ``FedTrimmedAvg`` applies per array), the
per-array median of ``FedMedian``, and ``select_multikrum`` of
``flwr.serverapp.strategy.multikrum`` (``Krum``/``MultiKrum``). Flower's strategies are not
used as they are because their ``aggregate_train`` raises on the first inconsistent reply
and averages integer buffers into floats (see :mod:`strategies.aggregation`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum

from strategies.aggregation import weighted_average_arrays


class Aggregator(Protocol):
    """``(records, weights) -> ArrayRecord``: one array record from the valid replies.

    The aggregators of this module also say how they use the weights
    (:func:`weights_used`) and whether a number of replies defeats them
    (:func:`aggregator_warning`); a plain function works too.
    """

    def __call__(self, records: list[ArrayRecord], weights: list[float]) -> ArrayRecord:
        """Combine ``records`` (one per valid reply, ``weights`` their averaging weights)."""
        ...


def weights_used(aggregator: Aggregator, weighting: str) -> str:
    """How ``aggregator`` uses the strategy's averaging weights (``weighting``), in words."""
    describe = getattr(aggregator, "weights_used", None)
    return describe(weighting) if callable(describe) else f"{weighting} weights (if it uses them)"


def aggregator_warning(aggregator: Aggregator, replies: int) -> str | None:
    """Why ``aggregator`` will not do what its name says with ``replies`` replies, if so."""
    check = getattr(aggregator, "warning", None)
    return check(replies) if callable(check) else None


def _per_array(
    records: list[ArrayRecord], reduce: Callable[[np.ndarray], np.ndarray]
) -> ArrayRecord:
    """``reduce`` (over axis 0 of the stacked arrays) for every key; dtypes kept (integer
    arrays are rounded back).
    """
    out: dict[str, Array] = {}
    for key, first in records[0].items():
        dtype = first.numpy().dtype
        stacked = np.stack([r[key].numpy().astype(np.float64) for r in records])
        value = np.asarray(reduce(stacked))
        if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
            value = np.rint(value)
        out[key] = Array(np.asarray(value.astype(dtype)))
    return ArrayRecord(out)


class Mean:
    """The weighted mean (FedAvg); integer buffers stay integers."""

    def __call__(self, records: list[ArrayRecord], weights: list[float]) -> ArrayRecord:  # noqa: D102
        return weighted_average_arrays(records, weights)

    def weights_used(self, weighting: str) -> str:  # noqa: D102
        return f"{weighting} weights"

    def __repr__(self) -> str:
        return "Mean()"


class TrimmedMean:
    """Coordinate-wise trimmed mean (Yin et al. 2018), Flower's ``FedTrimmedAvg`` rule.

    Parameters
    ----------
    trim_fraction : float (default: 0.1)
        Fraction cut at each end, in [0, 0.5) (Flower's ``beta``); with ``n`` replies,
        ``int(trim_fraction * n)`` values are cut on each side of every coordinate.
    """

    def __init__(self, trim_fraction: float = 0.1) -> None:
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self.trim_fraction = trim_fraction

    def __call__(self, records: list[ArrayRecord], weights: list[float]) -> ArrayRecord:  # noqa: D102
        return _per_array(records, lambda x: trim_mean(x, self.trim_fraction))

    def trimmed(self, replies: int) -> int:
        """How many values it cuts at each end of every coordinate with ``replies``."""
        return int(self.trim_fraction * replies)

    def weights_used(self, weighting: str) -> str:  # noqa: D102
        return "no weights: every reply counts once"

    def warning(self, replies: int) -> str | None:  # noqa: D102
        if self.trimmed(replies) == 0 and replies > 0:
            return (
                f"{self!r} trims int({self.trim_fraction} x {replies}) = 0 replies at each end "
                f"with {replies} replies: it is the plain (unweighted) mean; use a "
                f"trim_fraction of at least {1 / replies:.3g} to cut one at each end"
            )
        return None

    def __repr__(self) -> str:
        return f"TrimmedMean({self.trim_fraction})"


class Median:
    """Coordinate-wise median (Yin et al. 2018), Flower's ``FedMedian`` rule."""

    def __call__(self, records: list[ArrayRecord], weights: list[float]) -> ArrayRecord:  # noqa: D102
        return _per_array(records, lambda x: np.median(x, axis=0))

    def weights_used(self, weighting: str) -> str:  # noqa: D102
        return "no weights: every reply counts once"

    def __repr__(self) -> str:
        return "Median()"


class MultiKrum:
    """(Multi-)Krum (Blanchard et al. 2017): average the ``num_selected`` replies closest to
    their ``n - f - 2`` nearest neighbours, selected by Flower's ``select_multikrum``.

    Parameters
    ----------
    num_malicious : int (default: 1)
        Replies assumed malicious (``f``).
    num_selected : int (default: 1)
        Replies averaged after selection (1 = Krum); 0 = ``n - f``.
    """

    def __init__(self, num_malicious: int = 1, num_selected: int = 1) -> None:
        if num_malicious < 0 or num_selected < 0:
            raise ValueError("num_malicious and num_selected must be >= 0")
        self.num_malicious = num_malicious
        self.num_selected = num_selected

    def __call__(self, records: list[ArrayRecord], weights: list[float]) -> ArrayRecord:  # noqa: D102
        selected = self.num_selected or max(1, len(records) - self.num_malicious)
        contents = [RecordDict({"arrays": r}) for r in records]
        chosen = select_multikrum(contents, self.num_malicious, selected)
        index = [next(i for i, c in enumerate(contents) if c is ch) for ch in chosen]
        return weighted_average_arrays([records[i] for i in index], [weights[i] for i in index])

    def weights_used(self, weighting: str) -> str:  # noqa: D102
        return f"selection unweighted, then {weighting} weights over the selected replies"

    def warning(self, replies: int) -> str | None:  # noqa: D102
        if replies <= 2 * self.num_malicious + 2:
            return (
                f"{self!r} needs more than 2 x num_malicious + 2 = "
                f"{2 * self.num_malicious + 2} replies to select, got {replies}"
            )
        return None

    def __repr__(self) -> str:
        return f"MultiKrum(num_malicious={self.num_malicious}, num_selected={self.num_selected})"


def Krum(num_malicious: int = 1) -> MultiKrum:
    """Krum: the single reply closest to its neighbours (``MultiKrum(f, 1)``)."""
    return MultiKrum(num_malicious, 1)


RULES = ("mean", "trimmed-mean", "median", "krum", "multikrum")
"""The rule names :func:`make_aggregator` (and a strategy's ``aggregator=``) accept."""


def make_aggregator(
    rule: str, trim_fraction: float = 0.1, num_malicious: int = 1, num_selected: int = 0
) -> Aggregator:
    """The aggregator named ``rule`` (one of :data:`RULES`, ``aggregation.rule`` in the
    configuration), with the given settings.
    """
    if rule == "mean":
        return Mean()
    if rule == "trimmed-mean":
        return TrimmedMean(trim_fraction)
    if rule == "median":
        return Median()
    if rule == "krum":
        return Krum(num_malicious)
    if rule == "multikrum":
        return MultiKrum(num_malicious, num_selected)
    raise ValueError(f"unknown aggregation rule '{rule}'; one of {list(RULES)}")


def as_aggregator(value: object, name: str = "aggregator") -> Aggregator:
    """``value`` as an aggregator: ``None`` (the mean), a rule name of :data:`RULES` (with
    its default settings) or a callable ``(records, weights) -> ArrayRecord``; anything
    else is refused with a ``TypeError`` naming the argument and the choices.
    """
    if value is None:
        return Mean()
    if isinstance(value, str):
        if value not in RULES:
            raise ValueError(
                f"{name}={value!r} is not a rule name; use one of {list(RULES)} or an "
                "instance such as TrimmedMean(0.2), Median(), Krum(1), MultiKrum(1, 3) from "
                "strategies.aggregators"
            )
        return make_aggregator(value)
    if not callable(value):
        raise TypeError(
            f"{name} must be None (the mean), a rule name ({', '.join(RULES)}) or a callable "
            f"(records, weights) -> ArrayRecord such as strategies.aggregators.Median(); got "
            f"{type(value).__name__} {value!r}"
        )
    return value  # type: ignore[return-value]


__all__ = [
    "RULES",
    "Aggregator",
    "Krum",
    "Mean",
    "Median",
    "MultiKrum",
    "TrimmedMean",
    "aggregator_warning",
    "as_aggregator",
    "make_aggregator",
    "weights_used",
]
