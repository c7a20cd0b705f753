"""A Grid that checks for replies more often than Flower's own.

In Flower 1.42 the ServerApp's grid (``flwr.superlink.grid.http_grid``) pushes a round's
messages, then asks the SuperLink for replies every 3 s. A round therefore ends up to 3 s
after its last reply arrived, twice per round (train and evaluate). ``PollingGrid`` wraps
any ``Grid`` and asks every ``interval`` seconds instead; each ask is one small local
request. Everything else is passed through unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid
from flwr.supercore.run import Run


class PollingGrid(Grid):
    """``grid`` with replies collected every ``interval`` seconds."""

    def __init__(self, grid: Grid, interval: float):
        if interval <= 0:
            raise ValueError(f"poll interval must be > 0 seconds, got {interval}")
        self.grid = grid
        self.interval = interval

    def set_run(self, run: Run) -> None:
        """Pass through."""
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        """Pass through."""
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Pass through."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Pass through."""
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        """Pass through."""
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Pass through."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pass through."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``, then collect replies every ``interval`` seconds until all
        have arrived or ``timeout`` seconds have passed (the same contract as Flower's).
        """
        pending = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.interval)
        return replies
