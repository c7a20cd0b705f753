"""Checking and averaging client replies: arrays and metrics.

Written here rather than taken from ``flwr.serverapp.strategy.strategy_utils`` because
Flower's helpers raise on the first inconsistent reply (stopping the run), average
integer buffers into floats, and have no notion of spread over clients.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict


def reply_problem(
    content: RecordDict, reference: ArrayRecord, arrays_key: str, weight_key: str
) -> str | None:
    """Why a training reply cannot be averaged into ``reference``, or ``None``.

    The reply must hold exactly one ArrayRecord (under ``arrays_key``) with the same
    keys, shapes and dtypes as ``reference`` and only finite values, and exactly one
    MetricRecord whose ``weight_key`` is a positive number.
    """
    if list(content.array_records) != [arrays_key]:
        return f"expected one ArrayRecord '{arrays_key}', got {list(content.array_records)}"
    metric_records = list(content.metric_records.values())
    if len(metric_records) != 1:
        return f"expected one MetricRecord, got {len(metric_records)}"
    weight = metric_records[0].get(weight_key)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        return f"'{weight_key}' must be a number > 0, got {weight!r}"
    arrays = content[arrays_key]
    missing, extra = set(reference) - set(arrays), set(arrays) - set(reference)
    if missing or extra:
        return (
            f"array keys differ from the global model: missing {sorted(missing)}, "
            f"unexpected {sorted(extra)}"
        )
    for key, ref in reference.items():
        got = arrays[key]
        if tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
            return (
                f"array '{key}' is {got.dtype}{list(got.shape)}, expected "
                f"{ref.dtype}{list(ref.shape)}"
            )
        values = got.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"array '{key}' holds NaN or Inf"
    return None


def update_norm(arrays: ArrayRecord, reference: ArrayRecord) -> float:
    """L2 norm of ``arrays - reference`` over every floating array (a client's update)."""
    total = 0.0
    for key, ref in reference.items():
        ref_np = ref.numpy()
        if np.issubdtype(ref_np.dtype, np.floating):
            diff = arrays[key].numpy().astype(np.float64) - ref_np.astype(np.float64)
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return float(np.sqrt(total))


def weighted_average_arrays(records: list[ArrayRecord], weights: list[float]) -> ArrayRecord:
    """Weighted average of ArrayRecords with identical keys, shapes and dtypes.

    Sums run in float64. Floating arrays keep their dtype; integer arrays (such as
    BatchNorm's ``num_batches_tracked``) are rounded back to their integer dtype, so a
    counter stays a counter.
    """
    if not records or len(records) != len(weights):
        raise ValueError("need one weight per ArrayRecord, and at least one record")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weights must sum to > 0, got {weights}")
    out: dict[str, Array] = {}
    for key, first in records[0].items():
        dtype = first.numpy().dtype
        acc = np.zeros(first.shape, dtype=np.float64)
        for record, w in zip(records, weights, strict=True):
            acc += record[key].numpy().astype(np.float64) * (w / total)
        if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
            acc = np.rint(acc)
        out[key] = Array(np.asarray(acc.astype(dtype)))
    return ArrayRecord(out)


def weighted_mean_metrics(
    records: list[MetricRecord], weights: list[float], exclude: Iterable[str] = ()
) -> MetricRecord:
    """Weighted mean of every numeric metric, over the records that report it."""
    skip = set(exclude)
    sums: dict[str, float] = {}
    norms: dict[str, float] = {}
    for record, w in zip(records, weights, strict=True):
        for key, value in record.items():
            if key in skip or isinstance(value, (bool, list)):
                continue
            sums[key] = sums.get(key, 0.0) + float(value) * w
            norms[key] = norms.get(key, 0.0) + w
    return MetricRecord({k: sums[k] / norms[k] for k in sums if norms[k] > 0})


IDENTIFIERS = ("partition_id",)
"""Client metrics that identify rather than measure: never averaged."""


def aggregate_evaluate_metrics(records: list[MetricRecord], weight_key: str) -> MetricRecord:
    """Weighted means of the clients' evaluation metrics plus the spread of accuracies.

    For every ``*_acc`` metric the result also holds ``*_acc_min`` and ``*_acc_max`` over
    the clients that reported it, so the personalized accuracy reads as a mean with its
    range (the FML reference asks for both).
    """
    weights = [float(r[weight_key]) for r in records]  # type: ignore[arg-type]
    out = weighted_mean_metrics(records, weights, exclude=(weight_key, *IDENTIFIERS))
    for key in [k for k in out if k.endswith("_acc")]:
        values = [float(r[key]) for r in records if key in r]  # type: ignore[arg-type]
        out[f"{key}_min"] = min(values)
        out[f"{key}_max"] = max(values)
    out["num_clients"] = len(records)
    out["num_examples"] = int(sum(weights))
    return out


_FLOWER_REASON = re.compile(r"^<class '([^']+)'>:<'(.*)'>$", re.DOTALL)
_SIMULATION_WRAPPER = re.compile(
    r"^\s*Exception ClientAppException occurred\. Message: ", re.DOTALL
)
_PARTITION = re.compile(r"(?:^|\n|\w: )\s*partition (\d+): ([A-Z]\w*: [^\n]*)")
_RAISED = re.compile(
    r"^\s*([A-Z]\w*(?:Error|Exception|Exit|Warning|Timeout|Refused|Model|Mismatch)): (.+)$", re.M
)
_WRAPPERS = ("ClientAppException", "RayTaskError")


def describe_error(reason: str) -> tuple[int | None, str]:
    """``(partition id or None, one-line reason)`` of a client error reply.

    Flower writes ``<class 'ValueError'>:<'message'>``; in a simulation the class is a
    wrapper (``ClientAppException``, or Ray's ``RayTaskError(ClientAppException)`` whose
    message holds the whole traceback). This project's clients start their message with
    ``partition <i>: <ExceptionType>: ...``. The line kept is that one, else the raised
    exception's ``Type: message`` line of a traceback, else the first line.
    """
    kind, text = None, reason.strip()
    match = _FLOWER_REASON.match(text)
    if match:
        kind, text = match.group(1).rsplit(".", 1)[-1], match.group(2)
    text = _SIMULATION_WRAPPER.sub("", text).strip()
    found = _PARTITION.search(text)
    if found:  # "partition <i>: <ExceptionType>: ..." names the type itself
        return int(found.group(1)), found.group(2).strip()
    raised = [m for m in _RAISED.finditer(text) if not m.group(1).startswith(_WRAPPERS)]
    if raised:
        return None, f"{raised[-1].group(1)}: {raised[-1].group(2).strip()}"
    first = text.splitlines()[0].strip() if text.strip() else reason.strip()
    if kind and not kind.startswith(_WRAPPERS):
        first = f"{kind}: {first}"
    return None, first
