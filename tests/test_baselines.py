"""Each baseline's defining property, checked on the real client and strategy code."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client_app.app import evaluate, train
from client_app.state import node_slot
from fml_flower.models import build_model, head_keys
from fml_flower.personal import PERSONAL
from fml_flower.settings import RoundSettings
from fml_flower.training import sgd, supervised_epoch
from strategies.baselines import FedPer, FedProx, LocalOnly
from tests.conftest import new_run_id
from tests.test_strategy import _Grid, _reply


def _context(method: str, **extra: object) -> Context:
    run_config = {
        "experiment": "base",
        "model.meme": "mlp",
        "model.local": "mlp",
        "train.method": method,
        **extra,
    }
    return Context(
        run_id=new_run_id(),
        node_id=11,
        node_config={"partition-id": 1, "num-partitions": 10},
        state=RecordDict(),
        run_config=run_config,
    )


def _message(kind: str, arrays: ArrayRecord, **extra: object) -> Message:
    """A message as the baselines' strategies send it: for training, the round's settings
    (plus the method's own values, e.g. ``proximal-mu``); for evaluation, the round.
    """
    if kind == MessageType.TRAIN:
        settings = RoundSettings(lr=0.05, local_epochs=1, batch_size=32, round=1, extra=extra)
        record = ConfigRecord({"server-round": 1, **settings.to_config()})
    else:
        record = ConfigRecord({"server-round": 1, "round": 1})
    return Message(
        RecordDict({"arrays": arrays, "config": record}), dst_node_id=11, message_type=kind
    )


def _mlp(seed: int = 0) -> torch.nn.Module:
    return build_model("mlp", (1, 28, 28), 10, seed=seed)


def _personal(context: Context) -> dict[str, torch.Tensor]:
    """The personal model the client keeps in its ``context.state``."""
    saved = node_slot(context.state, PERSONAL)
    assert saved is not None, "the client kept no personal model"
    return saved.state


def test_fedprox_adds_exactly_the_proximal_gradient() -> None:
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    start = _mlp(1)
    anchor = [p.detach() + 0.5 for p in start.parameters()]
    plain, prox = _mlp(1), _mlp(1)
    mu, lr = 0.3, 0.1
    supervised_epoch(plain, sgd(plain, lr, 0, 0), (x, y), 8, torch.Generator().manual_seed(0))
    supervised_epoch(
        prox,
        sgd(prox, lr, 0, 0),
        (x, y),
        8,
        torch.Generator().manual_seed(0),
        proximal_mu=mu,
        anchor=anchor,
    )
    # grad of mu/2 ||w - a||^2 is mu (w - a); with one SGD step the difference is exact
    for p_plain, p_prox, w0, a in zip(
        plain.parameters(), prox.parameters(), start.parameters(), anchor, strict=True
    ):
        torch.testing.assert_close(p_prox - p_plain, -lr * mu * (w0.detach() - a))


def test_fedprox_strategy_sends_mu() -> None:
    strategy = FedProx(proximal_mu=0.01, min_available_nodes=1, min_train_nodes=1)
    msg = next(
        iter(
            strategy.configure_train(
                1, ArrayRecord(_mlp().state_dict()), ConfigRecord(), _Grid([1])
            )
        )
    )
    assert msg.content["config"]["proximal-mu"] == 0.01


def test_ditto_personal_model_is_pulled_to_the_global_one() -> None:
    global_arrays = ArrayRecord(_mlp(3).state_dict())
    start = _mlp(3).state_dict()
    distance = {}
    for lam in (0.0, 5.0):
        context = _context("ditto")
        reply = train(_message(MessageType.TRAIN, global_arrays, **{"ditto-lambda": lam}), context)
        assert set(reply.content["arrays"].keys()) == set(start)  # the global model goes back
        personal = _personal(context)
        distance[lam] = sum(((personal[k] - start[k]) ** 2).sum().item() for k in start)
    assert distance[5.0] < distance[0.0]


def test_fedper_head_never_leaves_the_client() -> None:
    model = _mlp()
    head = set(head_keys(model))
    assert head == {"net.5.weight", "net.5.bias"}
    strategy = FedPer(private_keys=sorted(head), min_available_nodes=1, min_train_nodes=1)
    sent = next(
        iter(
            strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), _Grid([1]))
        )
    )
    assert head.isdisjoint(sent.content["arrays"].keys())
    context = _context("fedper")
    reply = train(_message(MessageType.TRAIN, sent.content["arrays"]), context)
    replied = set(reply.content["arrays"].keys())
    assert replied == set(model.state_dict()) - head
    stored = _personal(context)
    assert head <= set(stored)  # the head stays in the client's state
    evaluated = evaluate(_message(MessageType.EVALUATE, sent.content["arrays"]), context)
    assert "personal_acc" in next(iter(evaluated.content.metric_records.values()))


def test_local_only_communicates_no_model() -> None:
    strategy = LocalOnly(min_available_nodes=1, min_train_nodes=1)
    msg = next(
        iter(
            strategy.configure_train(
                1, ArrayRecord(_mlp().state_dict()), ConfigRecord(), _Grid([1])
            )
        )
    )
    assert len(msg.content["arrays"]) == 0
    context = _context("local")
    reply = train(_message(MessageType.TRAIN, msg.content["arrays"]), context)
    assert not reply.content.array_records
    arrays, metrics = strategy.aggregate_train(1, [reply_as_from(reply)])
    assert arrays is None and metrics is not None
    # a local-only client that sends arrays anyway is dropped
    strategy.aggregate_train(2, [_reply(3, ArrayRecord(_mlp().state_dict()), {"num-examples": 4})])
    assert "must not send arrays" in strategy.round_log(2).train_dropped[0]


def reply_as_from(reply: Message) -> Message:
    """The client's reply content, as the server would receive it from node 11."""
    return _reply(11, None, dict(next(iter(reply.content.metric_records.values()))))


@pytest.mark.parametrize("method", ["fedavg", "fedprox"])
def test_fedavg_clients_report_the_global_model_as_theirs(method: str) -> None:
    context = _context(method)
    arrays = ArrayRecord(_mlp().state_dict())
    reply = train(_message(MessageType.TRAIN, arrays, **{"proximal-mu": 0.01}), context)
    assert set(reply.content["arrays"].keys()) == set(_mlp().state_dict())
    assert node_slot(context.state, PERSONAL) is None  # no personal model
    assert len(context.state) == 0  # no personal state at all
    metrics = next(
        iter(
            evaluate(
                _message(MessageType.EVALUATE, arrays), context
            ).content.metric_records.values()
        )
    )
    # the client's model is the global one: scored on its own test part, by hand here
    from client_app.app import ClientDataCache, client_config
    from fml_flower.training import evaluate as score

    own, _ = ClientDataCache().get(client_config(context), 1, 10, None)
    expected = score(_mlp(), own.test.x, own.test.y).accuracy
    assert metrics["global_acc"] == pytest.approx(expected)
    assert metrics["personal_acc"] == metrics["global_acc"]  # reported as its own
