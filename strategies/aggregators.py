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
    """``(records, weights) -> ArrayRecord``: one array record from the valid replies."""

    def __call__(self, records: list[ArrayRecord], weights: list[float]) -> ArrayRecord:
        """Combine ``records`` (one per valid reply, ``weights`` their averaging weights)."""
        ...


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

    def __repr__(self) -> str:
        return f"TrimmedMean({self.trim_fraction})"


class Median:
    """Coordinate-wise median (Yin et al. 2018), Flower's ``FedMedian`` rule."""

    def __call__(self, records: list[ArrayRecord], weights: list[float]) -> ArrayRecord:  # noqa: D102
        return _per_array(records, lambda x: np.median(x, axis=0))

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

    def __repr__(self) -> str:
        return f"MultiKrum(num_malicious={self.num_malicious}, num_selected={self.num_selected})"


def Krum(num_malicious: int = 1) -> MultiKrum:
    """Krum: the single reply closest to its neighbours (``MultiKrum(f, 1)``)."""
    return MultiKrum(num_malicious, 1)


def make_aggregator(
    rule: str, trim_fraction: float = 0.1, num_malicious: int = 1, num_selected: int = 0
) -> Aggregator:
    """The aggregator named by ``aggregation.rule`` (see :mod:`fml_flower.config`)."""
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
    raise ValueError(f"unknown aggregation rule '{rule}'")


__all__ = ["Aggregator", "Krum", "Mean", "Median", "MultiKrum", "TrimmedMean", "make_aggregator"]
