"""Client errors the server can read: which client failed, and why, in one line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

PREFIX = "partition "


@contextmanager
def naming_partition(partition_id: int | None) -> Iterator[None]:
    """Let an exception of the block name the client: its message becomes ``partition <i>:
    <ExceptionType>: <message>``, the exception itself (type, traceback, cause) unchanged.

    Flower sends a failed ClientApp's ``str(exception)`` to the server (in simulation
    without the exception's type), where :func:`strategies.aggregation.describe_error`
    turns it into one line naming the partition. Nothing changes when the partition is not
    known or the message already names one.
    """
    try:
        yield
    except Exception as err:
        text = str(err)
        if partition_id is not None and not text.startswith(PREFIX):
            err.args = (f"{PREFIX}{partition_id}: {type(err).__name__}: {text}",)
        raise
