"""New participants (``federation.join_round``): nodes join at a later round."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from client_app.app import describe
from fml_flower.config import ConfigError, load_config
from server_app.participants import PartitionJoins
from strategies import FedMutualLearning
from tests.conftest import new_run_id
from tests.test_strategy import _bn_model, _Grid

ARRAYS = ArrayRecord(_bn_model(0).state_dict())


class _QueryGrid(_Grid):
    """Answers every query with the real ClientApp handler of that node."""

    def __init__(self, partitions: dict[int, int], fail: int | None = None, silent: int = -1):
        super().__init__(list(partitions))
        self.partitions = partitions
        self.fail, self.silent = fail, silent
        self.queried: list[int] = []

    def send_and_receive(self, messages: list[Message], *, timeout: float) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.queried.append(node)
            if node == self.silent:
                continue
            if node == self.fail:
                replies.append(Message(Error(code=0, reason="no query handler"), reply_to=msg))
                continue
            context = Context(
                run_id=new_run_id(),
                node_id=node,
                node_config={"partition-id": self.partitions[node], "num-partitions": 9},
                state=RecordDict(),
                run_config={},
            )
            replies.append(describe(msg, context))
        return replies


def _sampled(strategy: FedMutualLearning, server_round: int, grid: _Grid) -> set[int]:
    sent = strategy.configure_train(server_round, ARRAYS, ConfigRecord(), grid)
    return {m.metadata.dst_node_id for m in sent}


def _joining(rounds: dict[int, int]):
    """A participation rule: node id -> first round (unlisted nodes: round 1)."""
    return lambda server_round, nodes: [n for n in nodes if rounds.get(n, 1) <= server_round]


def test_a_node_is_sampled_from_its_join_round_on() -> None:
    strategy = FedMutualLearning(
        participation=_joining({30: 3}),
        min_available_nodes=3,
        min_train_nodes=3,
        min_evaluate_nodes=3,
    )
    grid = _Grid([10, 20, 30])
    assert _sampled(strategy, 1, grid) == {10, 20}
    assert _sampled(strategy, 2, grid) == {10, 20}
    assert _sampled(strategy, 3, grid) == {10, 20, 30}
    evaluated = strategy.configure_evaluate(2, ARRAYS, ConfigRecord(), grid)
    assert {m.metadata.dst_node_id for m in evaluated} == {10, 20}
    # the minimums are not changed by sampling
    assert (
        strategy.min_available_nodes,
        strategy.min_train_nodes,
        strategy.min_evaluate_nodes,
    ) == (3, 3, 3)


def test_a_fraction_samples_a_fraction_of_the_joined_nodes() -> None:
    nodes = list(range(1, 11))
    strategy = FedMutualLearning(
        participation=_joining({n: 3 for n in nodes[4:]}),  # 4 from round 1, all 10 from 3
        fraction_train=0.5,
        min_available_nodes=10,
        min_train_nodes=5,
    )
    assert len(_sampled(strategy, 1, _Grid(nodes))) == 2
    assert len(_sampled(strategy, 3, _Grid(nodes))) == 5


def test_the_server_learns_partition_ids_and_asks_late_nodes() -> None:
    grid = _QueryGrid({101: 0, 102: 1, 103: 2, 104: 3})
    joins = PartitionJoins(grid, {2: 4, 3: 3}, timeout=5)
    assert joins.rounds_of(grid.nodes) == {101: 1, 102: 1, 103: 4, 104: 3}
    joins.check_known()
    assert grid.queried == [101, 102, 103, 104]
    strategy = FedMutualLearning(participation=joins, min_available_nodes=2, min_train_nodes=2)
    assert _sampled(strategy, 1, grid) == {101, 102}
    # node 104 restarts and comes back as 106; node 105 (partition 4, not listed) connects
    grid.partitions.update({105: 4, 106: 3})
    grid.nodes = [101, 102, 103, 105, 106]
    assert _sampled(strategy, 2, grid) == {101, 102, 105}  # 106 holds partition 3: round 3
    assert grid.queried == [101, 102, 103, 104, 105, 106]  # only the new ids were asked
    assert _sampled(strategy, 3, grid) == {101, 102, 105, 106}
    resumed = PartitionJoins(grid, {2: 4}, timeout=5, round_offset=2)
    assert resumed.rounds_of([103]) == {103: 2}
    typo = PartitionJoins(grid, {7: 2}, timeout=5)
    typo.rounds_of([101])
    with pytest.raises(ConfigError, match=r"partition ids \[7\] are held by no node"):
        typo.check_known()


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (_QueryGrid({1: 0, 2: 1}, fail=2), "node 2 did not give its partition id"),
        (_QueryGrid({1: 0, 2: 1}, silent=2), r"nodes \[2\] did not answer"),
        (_QueryGrid({1: 0, 2: 0}), "nodes 1 and 2 both hold partition 0"),
        (_QueryGrid({1: 0, 2: 12}), r"without a valid partition id and count \(got 12 of 9\)"),
    ],
)
def test_a_bad_partition_answer_stops_the_run(grid: _QueryGrid, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        PartitionJoins(grid, {0: 2}, timeout=5).rounds_of(list(grid.partitions))


def test_join_round_config_is_checked() -> None:
    cfg = load_config("base", {"federation.join_round": "{3: 2}", "federation.num_rounds": 4})
    assert cfg.federation.join_round == {3: 2}
    outside = r"federation.join_round.3: round 5 is outside 1..federation.num_rounds=4"
    with pytest.raises(ConfigError, match=outside):
        load_config("base", {"federation.join_round": "{3: 5}", "federation.num_rounds": 4})
    with pytest.raises(ConfigError, match=r"federation.join_round.3: round 0"):
        load_config("base", {"federation.join_round": "{3: 0}"})
