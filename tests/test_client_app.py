"""The ClientApp: what leaves the client, and the personalized model's life in the state."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client_app.app import evaluate_models, train
from client_app.state import META_KEY, MODEL_KEY, OPTIMIZER_KEY
from fml_flower.config import ConfigError
from fml_flower.models import build_model

RUN_CONFIG = {
    "experiment": "base",
    "model.meme": "mlp",
    "model.local": "lenet5",
    "train.momentum": 0.9,
}


def _context(run_config: dict | None = None) -> Context:
    return Context(
        run_id=1,
        node_id=11,
        node_config={"partition-id": 2, "num-partitions": 10},
        state=RecordDict(),
        run_config=run_config or RUN_CONFIG,
    )


def _global_arrays(seed: int = 0) -> ArrayRecord:
    return ArrayRecord(build_model("mlp", (1, 28, 28), 10, seed=seed).state_dict())


def _message(kind: str, server_round: int = 1, lr: float = 0.05, seed: int = 0) -> Message:
    config = ConfigRecord({"server-round": server_round, "lr": lr, "alpha": 0.5, "beta": 0.5})
    return Message(
        RecordDict({"arrays": _global_arrays(seed), "config": config}),
        dst_node_id=11,
        message_type=kind,
    )


def _state_dict(context: Context) -> dict[str, torch.Tensor]:
    return context.state[MODEL_KEY].to_torch_state_dict()


def test_only_the_meme_leaves_the_client() -> None:
    context = _context()
    reply = train(_message(MessageType.TRAIN), context)
    content = reply.content
    assert list(content.array_records) == ["arrays"]
    sent = content["arrays"].to_torch_state_dict()
    meme_keys = set(build_model("mlp", (1, 28, 28), 10).state_dict())
    assert set(sent) == meme_keys  # the meme architecture, nothing else
    personal = _state_dict(context)
    assert set(personal).isdisjoint(sent)  # the lenet5 stayed home
    assert not any(
        torch.equal(v, g)
        for v, g in zip(sent.values(), _global_arrays().to_torch_state_dict().values(), strict=True)
    )  # and the meme was trained
    metrics = next(iter(content.metric_records.values()))
    assert metrics["num-examples"] > 0 and metrics["partition_id"] == 2
    assert set(content.config_records) == set()


def test_personalized_model_persists_and_is_not_reinitialized() -> None:
    context = _context()
    train(_message(MessageType.TRAIN, 1), context)
    after_1 = _state_dict(context)
    fresh = build_model("lenet5", (1, 28, 28), 10, seed=0).state_dict()
    # Round 2 with lr = 0: the personalized model must come back exactly as stored.
    train(_message(MessageType.TRAIN, 2, lr=0.0, seed=1), context)
    after_2 = _state_dict(context)
    assert all(torch.equal(after_1[k], after_2[k]) for k in after_1)
    # Round 3 trains it further from there.
    train(_message(MessageType.TRAIN, 3, seed=2), context)
    after_3 = _state_dict(context)
    assert any(not torch.equal(after_2[k], after_3[k]) for k in after_2)
    assert any(not torch.equal(fresh[k], after_3[k]) for k in fresh)
    assert context.state[META_KEY]["rounds_trained"] == 3
    optimizer = context.state[OPTIMIZER_KEY]["state"]
    assert isinstance(optimizer, bytes) and len(optimizer) > 0


def test_a_stored_model_of_another_architecture_is_refused() -> None:
    context = _context()
    train(_message(MessageType.TRAIN), context)
    context.run_config = {**RUN_CONFIG, "model.local": "cnn"}
    with pytest.raises(RuntimeError, match="stored personalized model is a 'lenet5'"):
        train(_message(MessageType.TRAIN, 2), context)


def test_evaluate_reports_both_models_on_the_own_test_part() -> None:
    context = _context()
    before = evaluate_models(_message(MessageType.EVALUATE), context)
    metrics = next(iter(before.content.metric_records.values()))
    assert "global_acc" in metrics and "personal_acc" not in metrics  # not trained yet
    train(_message(MessageType.TRAIN), context)
    after = evaluate_models(_message(MessageType.EVALUATE), context)
    metrics = next(iter(after.content.metric_records.values()))
    assert 0 <= metrics["personal_acc"] <= 1 and 0 <= metrics["global_acc"] <= 1
    assert metrics["num-examples"] > 0
    assert list(after.content.array_records) == []


def test_node_config_local_model_picks_the_private_architecture() -> None:
    context = _context()
    context.node_config = {**context.node_config, "local-model": "cnn"}
    train(_message(MessageType.TRAIN), context)
    assert context.state["fml.personal.meta"]["arch"] == "cnn"
    bad = _context()
    bad.node_config = {**bad.node_config, "local-model": "nonsense"}
    with pytest.raises(ConfigError, match="unknown model 'nonsense'"):
        train(_message(MessageType.TRAIN), bad)
