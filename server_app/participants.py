"""New participants: which node holds which partition, and from which round it takes part.

``federation.join_round`` names clients by partition id, the only name a configuration
knows; the strategy samples node ids. Before the first round the ServerApp asks every
node for its partition id with one ``query`` message (answered by ``client_app.describe``)
and turns the join rounds into node ids.
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fml_flower.config import ConfigError


def query_partition_ids(grid: Grid, timeout: float) -> dict[int, int]:
    """Node id -> partition id of every connected node; raises if a node does not say."""
    nodes = list(grid.get_node_ids())
    messages = [
        Message(
            RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY
        )
        for n in nodes
    ]
    partitions: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise RuntimeError(f"node {node} did not give its partition id: {reply.error.reason}")
        records = list(reply.content.metric_records.values())
        pid = records[0].get("partition_id") if len(records) == 1 else None
        if not isinstance(pid, int) or isinstance(pid, bool) or pid < 0:
            raise RuntimeError(f"node {node} answered the partition query without a valid id")
        partitions[node] = pid
    missing = sorted(set(nodes) - set(partitions))
    if missing:
        raise RuntimeError(f"nodes {missing} did not answer the partition query in {timeout} s")
    seen: dict[int, int] = {}
    for node, pid in partitions.items():
        if pid in seen:
            raise RuntimeError(f"nodes {seen[pid]} and {node} both hold partition {pid}")
        seen[pid] = node
    return partitions


def node_join_rounds(
    join_round: Mapping[int, int], partitions: Mapping[int, int], round_offset: int = 0
) -> dict[int, int]:
    """``federation.join_round`` (partition id -> absolute round) as node id -> round of
    this run (a resumed run counts its rounds after ``round_offset``).
    """
    unknown = sorted(set(join_round) - set(partitions.values()))
    if unknown:
        raise ConfigError(
            f"federation.join_round: partition ids {unknown} are held by no node "
            f"(the nodes hold {sorted(partitions.values())})"
        )
    return {
        node: max(1, join_round[pid] - round_offset)
        for node, pid in partitions.items()
        if pid in join_round
    }
