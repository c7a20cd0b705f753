"""Robust aggregation of memes (Flower's trimmed mean, median, Krum) and the poisoning
attacks the experiments use."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from fml_flower.attacks import poison
from fml_flower.config import ConfigError, check_partition_ids, load_config
from strategies import FedMutualLearning
from strategies.aggregators import Krum, Mean, Median, MultiKrum, TrimmedMean, make_aggregator
from tests.conftest import new_run_id
from tests.test_strategy import _Grid, _reply


def _records(poisoned: np.ndarray | None, honest: int = 9, seed: int = 0) -> list[ArrayRecord]:
    rng = np.random.default_rng(seed)
    out = [
        ArrayRecord({"w": Array(rng.normal(1.0, 0.05, 500).astype(np.float32))})
        for _ in range(honest)
    ]
    if poisoned is not None:
        out.append(ArrayRecord({"w": Array(poisoned.astype(np.float32))}))
    return out


def _honest_range(records: list[ArrayRecord]) -> tuple[np.ndarray, np.ndarray]:
    stacked = np.stack([r["w"].numpy() for r in records])
    return stacked.min(axis=0), stacked.max(axis=0)


@pytest.mark.parametrize("attack", ["scale", "random"])
def test_a_poisoned_client_moves_the_trimmed_mean_less_than_a_bound(attack: str) -> None:
    """With one attacker in ten and one value cut at each end of every coordinate, the
    trimmed mean stays inside the honest clients' range; the plain mean does not."""
    honest = _records(None)
    mean_honest = np.mean([r["w"].numpy() for r in honest], axis=0)
    received = {"w": np.zeros(500, np.float32)}  # the global model; honest updates ~ +1
    rng = np.random.default_rng(1)
    bad = poison({"w": honest[0]["w"].numpy()}, received, attack, -10.0, rng)["w"] * (
        1 if attack == "scale" else 100.0
    )
    records = [*honest, ArrayRecord({"w": Array(bad)})]
    weights = [1.0] * len(records)
    lo, hi = _honest_range(honest)
    for rule in (TrimmedMean(0.1), Median()):
        got = rule(records, weights)["w"].numpy()
        assert np.all(got >= lo - 1e-6) and np.all(got <= hi + 1e-6), rule
        assert np.abs(got - mean_honest).max() <= (hi - lo).max()
    plain = Mean()(records, weights)["w"].numpy()
    assert np.abs(plain - mean_honest).max() > (hi - lo).max()  # the bound can fail


def test_krum_selects_an_honest_reply() -> None:
    honest = _records(None)
    records = [*honest, ArrayRecord({"w": Array(np.full(500, -9.0, np.float32))})]
    got = Krum(num_malicious=1)(records, [1.0] * len(records))["w"].numpy()
    assert any(np.array_equal(got, r["w"].numpy()) for r in honest)
    multi = MultiKrum(num_malicious=1, num_selected=0)(records, [1.0] * len(records))
    assert multi["w"].numpy().min() > 0  # the attacker (all -9) was not averaged in


def test_robust_rules_keep_integer_buffers_integers() -> None:
    records = [
        ArrayRecord({"n": Array(np.array(k, np.int64)), "w": Array(np.full(2, k, np.float32))})
        for k in (1, 2, 3, 10)
    ]
    for rule in (TrimmedMean(0.25), Median()):
        out = rule(records, [1.0] * 4)
        assert out["n"].numpy().dtype == np.int64 and out["w"].numpy().dtype == np.float32


def test_the_strategy_still_drops_malformed_replies_with_a_robust_rule() -> None:
    strategy = FedMutualLearning(
        aggregator=TrimmedMean(0.2), min_available_nodes=1, min_train_nodes=1
    )
    reference = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    list(strategy.configure_train(1, reference, ConfigRecord(), _Grid([1, 2, 3, 4, 5, 6])))
    good = [
        _reply(i, ArrayRecord({"w": Array(np.full(4, float(i), np.float32))}), {"num-examples": 5})
        for i in range(1, 6)
    ]
    nan = _reply(6, ArrayRecord({"w": Array(np.full(4, np.nan, np.float32))}), {"num-examples": 5})
    arrays, _ = strategy.aggregate_train(1, [*good, nan])
    assert np.allclose(arrays["w"].numpy(), 3.0)  # trimmed mean of 1..5 with one cut each end
    assert "NaN" in strategy.round_log(1).train_dropped[0]
    assert strategy.round_log(1).update_norms[3] == pytest.approx(6.0)  # |(3,3,3,3)|


def test_poison_scale_and_random() -> None:
    received = {"w": np.ones(1000, np.float32), "n": np.array(3, np.int64)}
    sent = {"w": np.full(1000, 1.5, np.float32), "n": np.array(4, np.int64)}
    scaled = poison(sent, received, "scale", -10.0, np.random.default_rng(0))
    assert np.allclose(scaled["w"], 1.0 - 10 * 0.5) and scaled["n"] == 4
    sent["w"] = np.random.default_rng(1).normal(0, 2.0, 1000).astype(np.float32)
    rand = poison(sent, received, "random", -10.0, np.random.default_rng(0))
    assert rand["w"].shape == (1000,) and rand["w"].dtype == np.float32
    assert rand["w"].std() == pytest.approx(sent["w"].std(), rel=0.1)
    assert not np.allclose(rand["w"], sent["w"])


def test_aggregation_configuration_is_checked() -> None:
    assert isinstance(make_aggregator("median"), Median)
    cfg = load_config(
        "base", {"aggregation.rule": "trimmed-mean", "aggregation.trim_fraction": 0.1}
    )
    with pytest.raises(ConfigError, match="cuts nothing"):
        check_partition_ids(cfg, 5)
    check_partition_ids(cfg, 10)
    krum = load_config("base", {"aggregation.rule": "krum", "aggregation.num_malicious": 2})
    with pytest.raises(ConfigError, match="needs more than"):
        check_partition_ids(krum, 6)
    attack = load_config("base", {"attack.kind": "scale", "attack.clients": [12]})
    with pytest.raises(ConfigError, match=r"attack.clients: partition ids \[12\]"):
        check_partition_ids(attack, 10)
    with pytest.raises(ConfigError, match=r"aggregation\.rule"):
        load_config("base", {"aggregation.rule": "geomed"})


def test_a_corrupt_global_model_never_reaches_the_personalized_model(tmp_path) -> None:
    """A poisoned aggregate (finite but huge) makes the meme's predictions NaN/Inf. The
    personalized model then trains on its labels alone (no NaN reaches it), the batches are
    counted in the reply, and the corrupt meme it sends back is non-finite (the strategy
    drops such a reply)."""
    import math

    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

    from client_app.app import train
    from client_app.state import node_slot, personal_file
    from fml_flower.checkpoint import load_checkpoint
    from fml_flower.models import build_model
    from fml_flower.personal import PERSONAL
    from fml_flower.settings import RoundSettings

    context = Context(
        run_id=new_run_id(),
        node_id=11,
        state=RecordDict(),
        node_config={"partition-id": 2, "num-partitions": 10, "state-dir": str(tmp_path)},
        run_config={"experiment": "base", "model.meme": "mlp", "model.local": "mlp"},
    )

    def message(server_round: int, scale: float) -> Message:
        state = build_model("mlp", (1, 28, 28), 10, seed=0).state_dict()
        arrays = ArrayRecord({k: v * scale for k, v in state.items()})
        settings = RoundSettings(
            lr=0.05, local_epochs=1, batch_size=32, round=server_round, alpha=0.5, beta=0.5
        )
        config = ConfigRecord({"server-round": server_round, **settings.to_config()})
        return Message(
            RecordDict({"arrays": arrays, "config": config}),
            dst_node_id=11,
            message_type=MessageType.TRAIN,
        )

    first = train(message(1, 1.0), context)
    assert first.content["metrics"]["meme_nonfinite_batches"] == 0
    reply = train(message(2, 1e30), context)
    metrics = reply.content["metrics"]
    assert metrics["meme_nonfinite_batches"] > 0
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
    after = node_slot(context.state, PERSONAL)
    assert after.rounds_trained == 2  # it trained, on the labels
    assert all(torch.isfinite(v).all() for v in after.state.values() if v.is_floating_point())
    assert load_checkpoint(personal_file(tmp_path, 2))["round"] == 2
    sent = reply.content["arrays"].to_torch_state_dict()
    assert not all(torch.isfinite(v).all() for v in sent.values())
