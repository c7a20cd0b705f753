"""Objective heterogeneity hook: FML with a private meme head (model.private_patterns)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client_app.app import evaluate_models, train
from client_app.methods import MEME_PRIVATE_KEY
from fml_flower.config import ConfigError, load_config
from fml_flower.models import build_model, matching_keys
from server_app.methods import has_complete_global_model
from strategies import FedMutualLearning
from tests.test_strategy import _Grid, _reply

HEAD = ["^net[.]5[.]"]  # the mlp's last linear layer
RUN_CONFIG = {
    "experiment": "base",
    "model.meme": "mlp",
    "model.local": "mlp",
    "model.private_patterns": str(HEAD),
}


def _mlp() -> torch.nn.Module:
    return build_model("mlp", (1, 28, 28), 10, seed=0)


def _shared() -> ArrayRecord:
    sd = _mlp().state_dict()
    head = set(matching_keys(_mlp(), HEAD))
    return ArrayRecord({k: v for k, v in sd.items() if k not in head})


def _message(kind: str, server_round: int = 1, lr: float = 0.05) -> Message:
    config = ConfigRecord({"server-round": server_round, "lr": lr, "alpha": 0.5, "beta": 0.5})
    return Message(
        RecordDict({"arrays": _shared(), "config": config}), dst_node_id=11, message_type=kind
    )


def test_meme_head_stays_on_the_client_between_rounds() -> None:
    context = Context(
        run_id=1,
        node_id=11,
        node_config={"partition-id": 0, "num-partitions": 10},
        state=RecordDict(),
        run_config=RUN_CONFIG,
    )
    reply = train(_message(MessageType.TRAIN, 1), context)
    head = set(matching_keys(_mlp(), HEAD))
    assert head == {"net.5.weight", "net.5.bias"}
    assert set(reply.content["arrays"].keys()) == set(_mlp().state_dict()) - head
    kept = context.state[MEME_PRIVATE_KEY].to_torch_state_dict()
    assert set(kept) == head
    train(_message(MessageType.TRAIN, 2, lr=0.0), context)  # lr 0: the head must come back as kept
    again = context.state[MEME_PRIVATE_KEY].to_torch_state_dict()
    assert all(torch.equal(kept[k], again[k]) for k in head)
    metrics = next(
        iter(
            evaluate_models(_message(MessageType.EVALUATE), context).content.metric_records.values()
        )
    )
    assert 0 <= metrics["global_acc"] <= 1  # shared body + this client's own meme head


def test_strategy_sends_and_expects_only_the_shared_part() -> None:
    full = ArrayRecord(_mlp().state_dict())
    head = matching_keys(_mlp(), HEAD)
    strategy = FedMutualLearning(private_keys=head, min_available_nodes=1, min_train_nodes=1)
    sent = next(iter(strategy.configure_train(1, full, ConfigRecord(), _Grid([1]))))
    assert set(head).isdisjoint(sent.content["arrays"].keys())
    shared = sent.content["arrays"].to_torch_state_dict()
    missing_one = {k: v for k, v in shared.items() if k != "net.1.weight"}
    result, _ = strategy.aggregate_train(
        1,
        [
            _reply(1, ArrayRecord(shared), {"num-examples": 3}),
            _reply(2, ArrayRecord(dict(_mlp().state_dict())), {"num-examples": 3}),  # head sent
            _reply(3, ArrayRecord(missing_one), {"num-examples": 3}),  # a shared array missing
        ],
    )
    assert result is not None and set(result.keys()) == set(shared)
    dropped = strategy.round_log(1).train_dropped
    assert len(dropped) == 2
    assert "unexpected ['net.5.bias', 'net.5.weight']" in dropped[0]
    assert "missing ['net.1.weight']" in dropped[1]


def test_private_patterns_config() -> None:
    cfg = load_config("base", {"model.private_patterns": "['^classifier\\\\.2\\\\.']"})
    assert not has_complete_global_model(cfg)
    with pytest.raises(ConfigError, match=r"model\.private_patterns: .* is not a regex"):
        load_config("base", {"model.private_patterns": "['(']"})
    with pytest.raises(ConfigError, match=r"supported for train\.method=fml"):
        load_config("base", {"model.private_patterns": "['x']", "train.method": "fedavg"})
