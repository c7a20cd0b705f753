"""New participants: which node holds which partition, and from which round it takes part.

``federation.join_round`` names clients by partition id, the only name a configuration
knows; the strategy samples node ids. :class:`PartitionJoins` asks every node it has not
seen before for its partition id with one ``query`` message (answered by
``client_app.describe``), so nodes that connect late or come back with a new id after a
restart get their partition's join round too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fml_flower.config import ConfigError


def query_partition_ids(
    grid: Grid, timeout: float, node_ids: Sequence[int] | None = None
) -> dict[int, tuple[int, int]]:
    """Node id -> ``(partition id, num partitions)`` of ``node_ids`` (default: every
    connected node); raises if a node does not answer with valid values.
    """
    nodes = list(grid.get_node_ids()) if node_ids is None else list(node_ids)
    messages = [
        Message(
            RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY
        )
        for n in nodes
    ]
    answers: dict[int, tuple[int, int]] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise RuntimeError(f"node {node} did not give its partition id: {reply.error.reason}")
        records = list(reply.content.metric_records.values())
        pid = records[0].get("partition_id") if len(records) == 1 else None
        n = records[0].get("num_partitions") if len(records) == 1 else None
        if not (_count(pid) and _count(n) and pid < n):  # type: ignore[operator]
            raise RuntimeError(
                f"node {node} answered the partition query without a valid partition id "
                f"and count (got {pid!r} of {n!r})"
            )
        answers[node] = (int(pid), int(n))  # type: ignore[arg-type]
    missing = sorted(set(nodes) - set(answers))
    if missing:
        raise RuntimeError(f"nodes {missing} did not answer the partition query in {timeout} s")
    return answers


class PartitionJoins:
    """``federation.join_round`` (partition id -> absolute round) as the strategy's
    ``participation``: the connected nodes that have joined by a round of this run.

    A resumed run counts its rounds after ``round_offset``. Raises if two connected nodes
    hold the same partition or nodes disagree on the number of partitions.
    """

    def __init__(
        self, grid: Grid, join_round: Mapping[int, int], timeout: float, round_offset: int = 0
    ) -> None:
        self.grid = grid
        self.join_round = dict(join_round)
        self.timeout = timeout
        self.round_offset = round_offset
        self.partitions: dict[int, tuple[int, int]] = {}

    def __call__(self, server_round: int, node_ids: list[int]) -> list[int]:
        """The nodes among ``node_ids`` that take part in ``server_round`` (of this run)."""
        rounds = self.rounds_of(node_ids)
        return [node for node in node_ids if rounds[node] <= server_round]

    def rounds_of(self, node_ids: list[int]) -> dict[int, int]:
        """Node id -> join round (of this run) for the connected ``node_ids``."""
        new = [n for n in node_ids if n not in self.partitions]
        if new:
            self.partitions.update(query_partition_ids(self.grid, self.timeout, new))
        holder: dict[int, int] = {}
        for node in node_ids:
            pid, _ = self.partitions[node]
            if pid in holder:
                raise RuntimeError(f"nodes {holder[pid]} and {node} both hold partition {pid}")
            holder[pid] = node
        counts = {self.partitions[n][1] for n in node_ids}
        if len(counts) > 1:
            raise RuntimeError(f"nodes disagree on num-partitions: {sorted(counts)}")
        return {
            node: max(1, self.join_round.get(self.partitions[node][0], 1) - self.round_offset)
            for node in node_ids
        }

    def check_known(self) -> None:
        """Raise :class:`ConfigError` if ``join_round`` names a partition no node holds."""
        held = sorted(pid for pid, _ in self.partitions.values())
        unknown = sorted(set(self.join_round) - set(held))
        if unknown:
            raise ConfigError(
                f"federation.join_round: partition ids {unknown} are held by no node "
                f"(the nodes hold {held})"
            )


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
