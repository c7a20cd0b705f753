"""New participants (``federation.join_round``): nodes join at a later round."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from client_app.app import describe
from fml_flower.config import ConfigError, load_config
from server_app.participants import node_join_rounds, query_partition_ids
from strategies import FedMutualLearning
from tests.test_strategy import _bn_model, _Grid


class _QueryGrid(_Grid):
    """Answers every query with the real ClientApp handler of that node."""

    def __init__(self, partitions: dict[int, int], fail: int | None = None):
        super().__init__(list(partitions))
        self.partitions = partitions
        self.fail = fail

    def send_and_receive(self, messages: list[Message], *, timeout: float) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node == self.fail:
                replies.append(Message(Error(code=0, reason="no query handler"), reply_to=msg))
                continue
            context = Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": self.partitions[node], "num-partitions": 9},
                state=RecordDict(),
                run_config={},
            )
            replies.append(describe(msg, context))
        return replies


def _sampled(strategy: FedMutualLearning, server_round: int, nodes: list[int]) -> set[int]:
    arrays = ArrayRecord(_bn_model(0).state_dict())
    sent = strategy.configure_train(server_round, arrays, ConfigRecord(), _Grid(nodes))
    return {m.metadata.dst_node_id for m in sent}


def test_a_node_is_sampled_from_its_join_round_on() -> None:
    strategy = FedMutualLearning(
        join_rounds={30: 3}, min_available_nodes=3, min_train_nodes=3, min_evaluate_nodes=3
    )
    assert _sampled(strategy, 1, [10, 20, 30]) == {10, 20}
    assert _sampled(strategy, 2, [10, 20, 30]) == {10, 20}
    assert _sampled(strategy, 3, [10, 20, 30]) == {10, 20, 30}
    arrays = ArrayRecord(_bn_model(0).state_dict())
    evaluated = strategy.configure_evaluate(2, arrays, ConfigRecord(), _Grid([10, 20, 30]))
    assert {m.metadata.dst_node_id for m in evaluated} == {10, 20}
    # the lowered minimums hold only while sampling
    assert (strategy.min_available_nodes, strategy.min_train_nodes) == (3, 3)


def test_the_server_learns_partition_ids_from_the_nodes() -> None:
    grid = _QueryGrid({101: 0, 102: 1, 103: 2})
    partitions = query_partition_ids(grid, timeout=5)
    assert partitions == {101: 0, 102: 1, 103: 2}
    assert node_join_rounds({2: 4}, partitions) == {103: 4}
    assert node_join_rounds({2: 4}, partitions, round_offset=2) == {103: 2}
    assert node_join_rounds({2: 4}, partitions, round_offset=6) == {103: 1}
    with pytest.raises(ConfigError, match=r"partition ids \[7\] are held by no node"):
        node_join_rounds({7: 2}, partitions)


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (_QueryGrid({1: 0, 2: 1}, fail=2), "node 2 did not give its partition id"),
        (_QueryGrid({1: 0, 2: 0}), "nodes 1 and 2 both hold partition 0"),
    ],
)
def test_a_bad_partition_answer_stops_the_run(grid: _QueryGrid, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        query_partition_ids(grid, timeout=5)


def test_join_round_config_is_checked() -> None:
    cfg = load_config("base", {"federation.join_round": "{3: 2}", "federation.num_rounds": 4})
    assert cfg.federation.join_round == {3: 2}
    outside = r"federation.join_round.3: round 5 is outside 1..federation.num_rounds=4"
    with pytest.raises(ConfigError, match=outside):
        load_config("base", {"federation.join_round": "{3: 5}", "federation.num_rounds": 4})
    with pytest.raises(ConfigError, match=r"federation.join_round.3: round 0"):
        load_config("base", {"federation.join_round": "{3: 0}"})
