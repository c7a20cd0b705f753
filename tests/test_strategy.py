"""FedMutualLearning: weighted averaging with buffers, and refusing malformed replies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from torch import nn

from fml_flower.settings import RoundSettings
from strategies import FedMutualLearning
from strategies.aggregation import weighted_average_arrays


def _bn_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    model.train()
    for _ in range(seed + 1):  # different running statistics and batch counters
        model(torch.randn(4, 1, 5, 5) * (seed + 1))
    return model


class _Grid:
    """Just enough of a Grid for configure_train."""

    def __init__(self, nodes: list[int]):
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _reply(
    node: int, arrays: ArrayRecord | None, metrics: dict | None, error: str | None = None
) -> Message:
    out = Message(
        content=RecordDict({"config": ConfigRecord()}),
        dst_node_id=node,
        message_type=MessageType.TRAIN,
    )
    if error is not None:
        return Message(Error(code=2, reason=error), reply_to=out)
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = arrays
    if metrics is not None:
        content["metrics"] = MetricRecord(metrics)
    return Message(content, reply_to=out)


def _strategy(reference: ArrayRecord) -> FedMutualLearning:
    strategy = FedMutualLearning(alpha=0.5, beta=0.5, min_available_nodes=1, min_train_nodes=1)
    list(strategy.configure_train(1, reference, ConfigRecord(), _Grid([1, 2, 3])))
    return strategy


def test_weighted_average_with_batchnorm_buffers() -> None:
    a, b = _bn_model(0).state_dict(), _bn_model(2).state_dict()
    out = weighted_average_arrays(
        [ArrayRecord(a), ArrayRecord(b)], [1.0, 3.0]
    ).to_torch_state_dict()
    for key in ("0.weight", "1.running_mean", "1.running_var", "1.weight"):
        torch.testing.assert_close(out[key], 0.25 * a[key] + 0.75 * b[key])
    counter = out["1.num_batches_tracked"]
    assert counter.dtype == torch.int64
    assert a["1.num_batches_tracked"] == 1 and b["1.num_batches_tracked"] == 3
    assert counter.item() == round(0.25 * 1 + 0.75 * 3)


def test_configure_train_sends_exactly_the_constructor_values() -> None:
    reference = ArrayRecord(_bn_model(0).state_dict())
    strategy = FedMutualLearning(
        alpha=0.3,
        beta=lambda r: 0.1 if r < 3 else 0.9,
        lr=lambda r: 0.1 / r,
        local_epochs=3,
        batch_size=16,
        momentum=0.9,
        weight_decay=5e-4,
        min_available_nodes=2,
        min_train_nodes=2,
        round_offset=1,  # a resumed run: round 2 of this run is round 3
    )
    messages = list(strategy.configure_train(2, reference, ConfigRecord(), _Grid([1, 2])))
    assert len(messages) == 2
    config = dict(messages[0].content["config"])
    assert config == {
        "lr": pytest.approx(0.1 / 3),
        "local-epochs": 3,
        "batch-size": 16,
        "momentum": 0.9,
        "weight-decay": 5e-4,
        "round": 3,
        "alpha": 0.3,
        "beta": 0.9,
        "distillation": "faithful",
        "server-round": 2,
    }
    # what the client reads back is what the strategy says it sends
    settings = RoundSettings.from_config(config, fml=True)
    assert settings == strategy.settings(2)


def test_summary_logs_what_is_sent(caplog: pytest.LogCaptureFixture) -> None:
    from flwr.common.logger import FLOWER_LOGGER

    FLOWER_LOGGER.addHandler(caplog.handler)
    try:
        FedMutualLearning(alpha=0.2, beta=lambda r: 0.5, lr=0.05, batch_size=8).summary()
    finally:
        FLOWER_LOGGER.removeHandler(caplog.handler)
    text = caplog.text
    assert "alpha: 0.2" in text and "lr: 0.05" in text and "batch-size: 8" in text
    assert "beta: 0.5 (per round)" in text and "alpha: 0.2 (per round)" not in text


def test_client_refuses_a_config_the_strategy_would_not_send() -> None:
    with pytest.raises(ValueError, match=r"lacks \['lr', 'local-epochs'"):
        RoundSettings.from_config({"alpha": 0.5, "beta": 0.5, "batch-size": 8}, fml=True)
    with pytest.raises(ValueError, match=r"alpha must be in \[0.0, 1.0\], got 1.5"):
        RoundSettings.from_config(
            {"lr": 0.1, "local-epochs": 1, "batch-size": 8, "alpha": 1.5, "beta": 0.5}
        )


def test_aggregate_train_weights_by_examples() -> None:
    ref = ArrayRecord(_bn_model(0).state_dict())
    a, b = _bn_model(1).state_dict(), _bn_model(2).state_dict()
    strategy = _strategy(ref)
    arrays, metrics = strategy.aggregate_train(
        1,
        [
            _reply(1, ArrayRecord(a), {"num-examples": 10, "train_loss_meme": 1.0}),
            _reply(2, ArrayRecord(b), {"num-examples": 30, "train_loss_meme": 2.0}),
        ],
    )
    assert arrays is not None and metrics is not None
    got = arrays.to_torch_state_dict()
    torch.testing.assert_close(got["0.weight"], 0.25 * a["0.weight"] + 0.75 * b["0.weight"])
    assert metrics["train_loss_meme"] == pytest.approx(1.75)
    assert strategy.round_log(1).train_accepted == 2


def _poisoned(kind: str) -> tuple[ArrayRecord | None, dict | None, str | None]:
    sd = _bn_model(1).state_dict()
    if kind == "nan":
        sd["0.weight"] = sd["0.weight"].clone()
        sd["0.weight"][0, 0, 0, 0] = float("nan")
    elif kind == "inf":
        sd["1.running_var"] = torch.full_like(sd["1.running_var"], float("inf"))
    elif kind == "missing-key":
        del sd["1.running_mean"]
    elif kind == "extra-key":
        sd["head.weight"] = torch.zeros(2)
    elif kind == "shape":
        sd["0.weight"] = torch.zeros(2, 1, 5, 5)
    elif kind == "dtype":
        sd["0.weight"] = sd["0.weight"].double()
    metrics: dict | None = {"num-examples": 10}
    if kind == "no-examples":
        metrics = {"loss": 1.0}
    elif kind == "zero-examples":
        metrics = {"num-examples": 0}
    elif kind == "no-metrics":
        metrics = None
    return ArrayRecord(sd), metrics, ("boom" if kind == "error" else None)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("nan", "NaN or Inf"),
        ("inf", "NaN or Inf"),
        ("missing-key", "missing"),
        ("extra-key", "unexpected"),
        ("shape", "expected float32"),
        ("dtype", "float64"),
        ("no-examples", "num-examples"),
        ("zero-examples", "num-examples"),
        ("no-metrics", "MetricRecord"),
        ("error", "client error: boom"),
    ],
)
def test_malformed_reply_is_dropped_not_fatal(kind: str, reason: str) -> None:
    ref = ArrayRecord(_bn_model(0).state_dict())
    good = _bn_model(2).state_dict()
    strategy = _strategy(ref)
    arrays, metrics, error = _poisoned(kind)
    result, _ = strategy.aggregate_train(
        1,
        [
            _reply(1, ArrayRecord(good), {"num-examples": 5}),
            _reply(7, arrays, metrics, error),
        ],
    )
    assert result is not None
    got = result.to_torch_state_dict()
    for key, value in good.items():  # only the good reply was averaged
        torch.testing.assert_close(got[key], value)
    book = strategy.round_log(1)
    assert book.train_accepted == 1
    assert len(book.train_dropped) == 1
    assert book.train_dropped[0].startswith("node 7:") and reason in book.train_dropped[0]


def test_all_replies_bad_keeps_the_global_model() -> None:
    strategy = _strategy(ArrayRecord(_bn_model(0).state_dict()))
    malformed = [_reply(1, None, {"num-examples": 5}), _reply(2, None, None, error="down")]
    arrays, metrics = strategy.aggregate_train(1, malformed)  # no arrays; a client error
    assert arrays is None and metrics is None


def test_aggregate_evaluate_reports_mean_and_spread() -> None:
    strategy = _strategy(ArrayRecord(_bn_model(0).state_dict()))
    out = strategy.aggregate_evaluate(
        1,
        [
            _reply(
                1,
                None,
                {"num-examples": 10, "personal_acc": 0.9, "global_acc": 0.5, "partition_id": 0},
            ),
            _reply(
                2,
                None,
                {"num-examples": 30, "personal_acc": 0.5, "global_acc": 0.1, "partition_id": 1},
            ),
            _reply(3, None, None, error="crashed"),
        ],
    )
    assert out is not None
    assert out["personal_acc"] == pytest.approx(0.6)
    assert (out["personal_acc_min"], out["personal_acc_max"]) == (0.5, 0.9)
    assert out["global_acc"] == pytest.approx(0.2)
    assert out["num_clients"] == 2
    book = strategy.round_log(1)
    assert set(book.clients) == {0, 1}
    assert len(book.evaluate_dropped) == 1


def test_alpha_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="alpha must be in"):
        FedMutualLearning(alpha=2.0)
    with pytest.raises(ValueError, match="beta must be in"):
        FedMutualLearning(beta=lambda r: 1.2)  # a schedule's first value is checked too


def test_weighted_average_needs_positive_weights() -> None:
    rec = ArrayRecord([np.ones(2, dtype=np.float32)])
    with pytest.raises(ValueError, match="weights must sum"):
        weighted_average_arrays([rec], [0.0])


class _DyingGrid:
    """Nodes come and go: ``get_node_ids`` returns the next list each call (the last one
    from then on)."""

    def __init__(self, *views: list[int]):
        self.views, self.calls = list(views), 0

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        return self.views[min(self.calls - 1, len(self.views) - 1)]


def test_a_round_waits_a_bounded_time_for_nodes_then_stops_naming_them() -> None:
    """A node that died is not waited for forever (Flower's sample_nodes would)."""
    import time

    from strategies.robust import NodeWaitTimeout

    strategy = FedMutualLearning(min_available_nodes=2, min_train_nodes=2, node_wait=1.0)
    t0 = time.monotonic()
    with pytest.raises(NodeWaitTimeout, match=r"round 3: waited 1 s for 2 connected nodes.*\[7\]"):
        strategy.sample(3, _DyingGrid([7]), 1.0, 2)  # type: ignore[arg-type]
    assert 1.0 <= time.monotonic() - t0 < 3.0
    # a node that (re)connects within the wait is sampled
    grid = _DyingGrid([7], [7], [7, 8])
    assert sorted(strategy.sample(1, grid, 1.0, 2)) == [7, 8]  # type: ignore[arg-type]
    # without node_wait the strategy waits as Flower does (here: until the node is back)
    patient = FedMutualLearning(min_available_nodes=2, min_train_nodes=2)
    assert sorted(patient.sample(1, _DyingGrid([7], [7, 9]), 1.0, 2)) == [7, 9]  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="node_wait"):
        FedMutualLearning(node_wait=0)
    # once the partitions are known, the stop names the missing one, not the survivors
    strategy.node_partitions = {7: 0, 8: 1, 9: 2}
    with pytest.raises(
        NodeWaitTimeout, match=r"Missing: partition 2 \(last seen as node 9\)\. The run stops"
    ):
        strategy.sample(4, _DyingGrid([7, 8]), 1.0, 3)  # type: ignore[arg-type]


def test_every_client_failing_the_same_way_stops_the_run_with_their_reasons() -> None:
    from strategies.robust import ClientsRefused

    strategy = _strategy(ArrayRecord(_bn_model(0).state_dict()))
    refused = (
        "<class 'fml_flower.checkpoint.CheckpointError'>:<'node0/personal-p0.ckpt holds "
        "a 'resnet18''>"
    )
    same = [_reply(n, None, None, error=refused.replace("node0", f"node{n}")) for n in (1, 2, 3)]
    with pytest.raises(
        ClientsRefused, match=r"every sampled client \(3\) failed with .*CheckpointError.*node 1: "
    ):
        strategy.aggregate_train(1, same)
    mixed = [*same[:2], _reply(3, None, None, error="<class 'RuntimeError'>:<'out of memory'>")]
    assert strategy.aggregate_train(2, mixed) == (None, None)  # keeps going, drops counted
    assert len(strategy.round_log(2).train_dropped) == 3


def test_pfllib_distillation_is_sent_and_averages_uniformly() -> None:
    strategy = FedMutualLearning(distillation="pfllib")
    assert strategy.weighting == "uniform"
    assert strategy.settings(1).distillation == "pfllib"
    assert FedMutualLearning(distillation="pfllib", weighting="examples").weighting == "examples"
    assert FedMutualLearning().weighting == "examples"
    with pytest.raises(ValueError, match="distillation must be one of"):
        FedMutualLearning(distillation="kl")


def test_evaluate_every_skips_the_evaluation_of_other_rounds() -> None:
    from strategies.robust import EVALUATE_BEFORE_TRAIN

    strategy = FedMutualLearning(evaluate_in_train=True, evaluate_every=5)
    strategy.final_round = 12
    assert [r for r in range(0, 13) if strategy.evaluates(r)] == [5, 10, 12]
    # in-train: round r's training message asks for the scores of round r - 1
    asks = [
        r
        for r in range(1, 13)
        if strategy.train_config(r, ConfigRecord()).get(EVALUATE_BEFORE_TRAIN)
    ]
    assert asks == [6, 11]  # round 12, the last, gets an evaluation message
    resumed = FedMutualLearning(evaluate_every=5, round_offset=3)
    resumed.final_round = 9
    assert [r for r in range(1, 10) if resumed.evaluates(r)] == [2, 7, 9]  # absolute 5, 10
    with pytest.raises(ValueError, match="evaluate_every must be >= 1"):
        FedMutualLearning(evaluate_every=0)


# ------------------------------------- the plug-in user's mistakes, caught before round 1


def test_an_aggregator_given_by_name_is_resolved_and_a_wrong_one_refused() -> None:
    from strategies.aggregators import Median, TrimmedMean

    assert isinstance(FedMutualLearning(aggregator="median").aggregator, Median)
    assert repr(FedMutualLearning(aggregator="trimmed-mean").aggregator) == "TrimmedMean(0.1)"
    assert isinstance(FedMutualLearning(aggregator=TrimmedMean(0.2)).aggregator, TrimmedMean)
    with pytest.raises(ValueError, match=r"aggregator='mediam' is not a rule name; use one of"):
        FedMutualLearning(aggregator="mediam")
    with pytest.raises(TypeError, match=r"aggregator must be None .* got int 42"):
        FedMutualLearning(aggregator=42)  # type: ignore[arg-type]


def test_a_trimmed_mean_that_trims_nothing_is_named_at_the_first_round(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from strategies.aggregators import TrimmedMean

    strategy = FedMutualLearning(
        aggregator=TrimmedMean(0.1), min_available_nodes=6, min_train_nodes=6
    )
    reference = ArrayRecord(_bn_model(0).state_dict())
    with caplog.at_level("WARNING", logger="flwr"):
        list(strategy.configure_train(1, reference, ConfigRecord(), _Grid(list(range(1, 7)))))
    assert "TrimmedMean(0.1) trims int(0.1 x 6) = 0 replies at each end" in caplog.text
    assert "at least 0.167" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="flwr"):
        strategy.summary()
    assert "no weights: every reply counts once" in caplog.text  # not "examples weights"


def test_per_round_lists_are_schedules_checked_against_the_rounds() -> None:
    strategy = FedMutualLearning(alpha=[0.9, 0.5], lr=(0.1, 0.05))
    assert strategy.settings(2).alpha == 0.5 and strategy.settings(1).lr == 0.1
    strategy.check_schedules(2)
    with pytest.raises(ValueError, match=r"lr: the per-round list has 2 values but the run has 3"):
        strategy.check_schedules(3)
    with pytest.raises(ValueError, match=r"alpha must be in \[0.0, 1.0\], got 1.5"):
        FedMutualLearning(alpha=[1.5, 0.5])
    with pytest.raises(ValueError, match=r"round 2: alpha must be in \[0.0, 1.0\], got 1.5"):
        FedMutualLearning(alpha=[0.5, 1.5])
    with pytest.raises(TypeError, match="alpha must be a number, a function of the round"):
        FedMutualLearning(alpha="0.5")  # type: ignore[arg-type]


def test_a_client_error_is_one_line_naming_the_partition_and_left_out_of_the_evaluation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ref = ArrayRecord(_bn_model(0).state_dict())
    strategy = _strategy(ref)
    reason = (
        "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException "
        "ClientAppException occurred. Message: partition 3: ValueError: the personalized "
        "model outputs 7, the meme model outputs 10: both must ...\nTraceback (most recent "
        "call last): ...'>"
    )
    with caplog.at_level("WARNING", logger="flwr"):
        strategy.aggregate_train(
            1,
            [
                _reply(1, ArrayRecord(_bn_model(2).state_dict()), {"num-examples": 5}),
                _reply(7, None, None, reason),
            ],
        )
    line = (
        "dropped the reply of partition 3 (node 7): client error: ValueError: the "
        "personalized model outputs 7, the meme model outputs 10: both must ..."
    )
    assert line in caplog.text and "Traceback" not in caplog.text
    assert strategy.round_log(1).failed == {3: line.split("client error: ")[1]}  # by partition
    assert strategy.round_log(1).failed_nodes == {7: line.split("client error: ")[1]}
    evaluated = strategy.aggregate_evaluate(
        1,
        [
            _reply(1, None, {"num-examples": 5, "personal_acc": 0.9, "partition_id": 0}),
            _reply(7, None, {"num-examples": 5, "personal_acc": 0.1, "partition_id": 3}),
        ],
    )
    assert evaluated is not None and evaluated["num_clients"] == 1  # partition 3 left out
    assert strategy.client_results(1) == {0: {"personal_acc": 0.9, "num-examples": 5.0}}


def test_a_new_run_says_which_clients_continued_saved_personal_models(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A durable state folder reused by a new run is named in round 1, not silent."""
    ref = ArrayRecord(_bn_model(0).state_dict())
    a, b = _bn_model(1).state_dict(), _bn_model(2).state_dict()
    fresh = {"num-examples": 10, "partition_id": 0, "personal_restored_from_disk": 0.0}
    saved = {"num-examples": 10, "partition_id": 1, "personal_restored_from_disk": 1.0}
    strategy = _strategy(ref)
    with caplog.at_level("INFO", logger="flwr"):
        strategy.aggregate_train(1, [_reply(1, ArrayRecord(a), fresh)])
    assert "continued the personalized models" not in caplog.text
    strategy = _strategy(ref)
    with caplog.at_level("INFO", logger="flwr"):
        strategy.aggregate_train(
            1, [_reply(1, ArrayRecord(a), fresh), _reply(2, ArrayRecord(b), saved)]
        )
    assert "round 1: partitions [1] continued the personalized models" in caplog.text
