"""Objective heterogeneity hook: FML with a private meme head (model.private_patterns)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

import fml_flower.methods.fml as fml_method
from client_app.app import evaluate, train
from client_app.state import node_slot
from fml_flower.config import ConfigError, load_config
from fml_flower.methods import get_method
from fml_flower.models import build_model, matching_keys
from fml_flower.personal import MEME_PRIVATE, cpu_state
from fml_flower.settings import RoundSettings
from strategies import FedMutualLearning
from tests.conftest import new_run_id
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
    """A message as FedMutualLearning sends it (the shared part of the meme only)."""
    if kind == MessageType.TRAIN:
        settings = RoundSettings(
            lr=lr, local_epochs=1, batch_size=32, round=server_round, alpha=0.5, beta=0.5
        )
        config = ConfigRecord({"server-round": server_round, **settings.to_config()})
    else:
        config = ConfigRecord({"server-round": server_round, "round": server_round})
    return Message(
        RecordDict({"arrays": _shared(), "config": config}), dst_node_id=11, message_type=kind
    )


def _kept_head(context: Context) -> dict[str, torch.Tensor]:
    saved = node_slot(context.state, MEME_PRIVATE)
    assert saved is not None, "the meme's private part was not kept"
    return saved.state


def test_meme_head_stays_on_the_client_between_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    memes_at_start: list[dict[str, torch.Tensor]] = []  # the meme as each round trains it
    real_step = fml_method.mutual_step

    def spy(local: torch.nn.Module, meme: torch.nn.Module, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        memes_at_start.append(cpu_state(meme))
        return real_step(local, meme, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fml_method, "mutual_step", spy)
    context = Context(
        run_id=new_run_id(),
        node_id=11,
        node_config={"partition-id": 0, "num-partitions": 10},
        state=RecordDict(),
        run_config=RUN_CONFIG,
    )
    reply = train(_message(MessageType.TRAIN, 1), context)
    head = set(matching_keys(_mlp(), HEAD))
    assert head == {"net.5.weight", "net.5.bias"}
    assert set(reply.content["arrays"].keys()) == set(_mlp().state_dict()) - head
    kept = _kept_head(context)
    assert set(kept) == head
    assert not all(torch.equal(kept[k], memes_at_start[0][k]) for k in head)  # trained
    # Round 2 must start from the kept head, bit for bit (and train it further).
    train(_message(MessageType.TRAIN, 2), context)
    assert len(memes_at_start) == 2
    assert all(torch.equal(kept[k], memes_at_start[1][k]) for k in head)
    again = _kept_head(context)
    assert set(again) == head and not all(torch.equal(kept[k], again[k]) for k in head)
    metrics = next(
        iter(evaluate(_message(MessageType.EVALUATE), context).content.metric_records.values())
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
    cfg = load_config("base", {"model.private_patterns": "['^classifier[.]3[.]']"})
    meme = build_model(cfg.model.meme, (1, 28, 28), 10)  # the base meme: a cnn
    assert matching_keys(meme, cfg.model.private_patterns) == [
        "classifier.3.weight",
        "classifier.3.bias",
    ]  # its last layer stays on the clients
    fml = get_method(cfg.train.method)
    assert not fml.central_evaluation(cfg, meme)
    assert fml.central_evaluation(load_config("base", {}), meme)  # the whole meme is shared
    with pytest.raises(ConfigError, match=r"model\.private_patterns: .* is not a regex"):
        load_config("base", {"model.private_patterns": "['(']"})
    with pytest.raises(ConfigError, match=r"not supported by train\.method=fedavg"):
        load_config("base", {"model.private_patterns": "['x']", "train.method": "fedavg"})
