"""The ClientApp: what leaves the client, and the personalized model's life in the state."""

from __future__ import annotations

import io

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

import fml_flower.methods.fml as fml_method
from client_app.app import evaluate, train
from client_app.state import node_slot
from fml_flower.config import ConfigError
from fml_flower.models import build_model
from fml_flower.personal import PERSONAL, ArchitectureMismatch, SavedModel, cpu_state
from fml_flower.settings import RoundSettings
from tests.conftest import new_run_id

RUN_CONFIG = {
    "experiment": "base",
    "model.meme": "mlp",
    "model.local": "lenet5",
    "train.momentum": 0.9,
}


def _context(run_config: dict | None = None) -> Context:
    return Context(
        run_id=new_run_id(),
        node_id=11,
        node_config={"partition-id": 2, "num-partitions": 10},
        state=RecordDict(),
        run_config=run_config or RUN_CONFIG,
    )


def _global_arrays(seed: int = 0) -> ArrayRecord:
    return ArrayRecord(build_model("mlp", (1, 28, 28), 10, seed=seed).state_dict())


def _message(kind: str, server_round: int = 1, lr: float = 0.05, seed: int = 0) -> Message:
    """A message as FedMutualLearning sends it for ``RUN_CONFIG`` (momentum 0.9)."""
    if kind == MessageType.TRAIN:
        settings = RoundSettings(
            lr=lr,
            local_epochs=1,
            batch_size=32,
            momentum=0.9,
            round=server_round,
            alpha=0.5,
            beta=0.5,
        )
        config = ConfigRecord({"server-round": server_round, **settings.to_config()})
    else:
        config = ConfigRecord({"server-round": server_round, "round": server_round})
    return Message(
        RecordDict({"arrays": _global_arrays(seed), "config": config}),
        dst_node_id=11,
        message_type=kind,
    )


def _saved(context: Context) -> SavedModel:
    saved = node_slot(context.state, PERSONAL)
    assert saved is not None, "no personalized model in context.state"
    return saved


def _state_dict(context: Context) -> dict[str, torch.Tensor]:
    return _saved(context).state


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def starts(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    """The personalized model's weights as each FML round starts training it."""
    seen: list[dict[str, torch.Tensor]] = []
    real = fml_method.mutual_step

    def spy(local: torch.nn.Module, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        seen.append(cpu_state(local))
        return real(local, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fml_method, "mutual_step", spy)
    return seen


def test_only_the_meme_leaves_the_client() -> None:
    context = _context()
    reply = train(_message(MessageType.TRAIN), context)
    content = reply.content
    assert list(content.array_records) == ["arrays"]
    sent = content["arrays"].to_torch_state_dict()
    meme_keys = set(build_model("mlp", (1, 28, 28), 10).state_dict())
    assert set(sent) == meme_keys  # the meme architecture, nothing else
    personal = _state_dict(context)
    # the lenet5 stayed home: none of its tensors is in the reply, under any key
    assert not any(
        v.shape == p.shape and torch.equal(v, p) for v in sent.values() for p in personal.values()
    )
    assert not any(
        torch.equal(v, g)
        for v, g in zip(sent.values(), _global_arrays().to_torch_state_dict().values(), strict=True)
    )  # and the meme was trained
    metrics = next(iter(content.metric_records.values()))
    assert metrics["num-examples"] > 0 and metrics["partition_id"] == 2
    assert set(content.config_records) == set()


def test_personalized_model_persists_and_is_not_reinitialized(
    starts: list[dict[str, torch.Tensor]],
) -> None:
    context = _context()
    train(_message(MessageType.TRAIN, 1), context)
    after_1 = _state_dict(context)
    fresh = starts[0]  # the client's own initialization, in round 1
    assert not _equal(fresh, after_1)  # round 1 trained it
    # Round 2 must start from the stored model, bit for bit, and train it further.
    train(_message(MessageType.TRAIN, 2, seed=1), context)
    after_2 = _state_dict(context)
    assert _equal(starts[1], after_1)
    assert not _equal(after_1, after_2)
    # Round 3 trains it further from there.
    train(_message(MessageType.TRAIN, 3, seed=2), context)
    after_3 = _state_dict(context)
    assert len(starts) == 3 and _equal(starts[2], after_2)
    assert any(not torch.equal(after_2[k], after_3[k]) for k in after_2)
    assert any(not torch.equal(fresh[k], after_3[k]) for k in fresh)
    saved = _saved(context)
    assert saved.rounds_trained == 3 and saved.arch == "lenet5"
    optimizer = saved.optimizer
    state = torch.load(io.BytesIO(optimizer), weights_only=True)["state"]
    n_params = len(list(build_model("lenet5", (1, 28, 28), 10).parameters()))
    assert len(state) == n_params  # one momentum buffer per parameter (momentum 0.9)
    assert all(s["momentum_buffer"].abs().sum() > 0 for s in state.values())


def test_a_stored_model_of_another_architecture_is_refused() -> None:
    context = _context()
    train(_message(MessageType.TRAIN), context)
    stored = _state_dict(context)
    context.run_config = {**RUN_CONFIG, "model.local": "cnn"}
    with pytest.raises(ArchitectureMismatch, match=r"saved 'personal' model \(a 'lenet5'\)"):
        train(_message(MessageType.TRAIN, 2), context)
    assert _equal(_state_dict(context), stored)  # not replaced


def test_evaluate_reports_both_models_on_the_own_test_part() -> None:
    context = _context()
    before = evaluate(_message(MessageType.EVALUATE), context)
    metrics = next(iter(before.content.metric_records.values()))
    assert "global_acc" in metrics and "personal_acc" not in metrics  # not trained yet
    train(_message(MessageType.TRAIN), context)
    after = evaluate(_message(MessageType.EVALUATE), context)
    metrics = next(iter(after.content.metric_records.values()))
    assert list(after.content.array_records) == []
    # recomputed here on partition 2's own test part: the same numbers, to the last digit
    from client_app.app import ClientDataCache, client_config
    from fml_flower.training import evaluate as score

    cfg = client_config(context)
    own, _ = ClientDataCache().get(cfg, 2, 10, None)
    other, _ = ClientDataCache().get(cfg, 3, 10, None)
    meme = build_model("mlp", (1, 28, 28), 10)
    meme.load_state_dict(_global_arrays().to_torch_state_dict())
    personal = build_model("lenet5", (1, 28, 28), 10)
    personal.load_state_dict(_state_dict(context))
    assert metrics["num-examples"] == len(own.test.y)
    assert metrics["global_acc"] == pytest.approx(score(meme, own.test.x, own.test.y).accuracy)
    assert metrics["personal_acc"] == pytest.approx(
        score(personal, own.test.x, own.test.y).accuracy
    )
    elsewhere = [
        score(personal, own.train.x, own.train.y).accuracy,
        score(personal, other.test.x, other.test.y).accuracy,
    ]
    assert all(metrics["personal_acc"] != pytest.approx(a) for a in elsewhere)


def test_node_config_local_model_picks_the_private_architecture() -> None:
    context = _context()
    context.node_config = {**context.node_config, "local-model": "cnn"}
    train(_message(MessageType.TRAIN), context)
    assert _saved(context).arch == "cnn"
    assert set(_state_dict(context)) == set(build_model("cnn", (1, 28, 28), 10).state_dict())
    bad = _context()
    bad.node_config = {**bad.node_config, "local-model": "nonsense"}
    with pytest.raises(ConfigError, match="unknown model 'nonsense'"):
        train(_message(MessageType.TRAIN), bad)


def test_simulated_clients_read_the_partitions_the_server_wrote(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """In simulation the ServerApp writes every client's ready tensors once; a worker then
    serves any number of clients without importing the dataset libraries, and keeps only
    the client it served last in memory."""
    import subprocess
    import sys

    from fml_flower.config import load_config
    from fml_flower.data import federated_data, write_partitions

    cfg = load_config("base", {})
    assert write_partitions(federated_data(cfg.data, 4), 4, tmp_path) == 4
    assert write_partitions(federated_data(cfg.data, 4), 4, tmp_path) == 0  # already there
    script = f"""
import sys
from pathlib import Path
from client_app.app import DATA, ClientDataCache
from fml_flower.config import load_config
cfg = load_config("base", {{}})
got = [DATA.get(cfg, pid, 4, Path({str(tmp_path)!r}))[0] for pid in range(4)]
assert "datasets" not in sys.modules and "flwr_datasets" not in sys.modules
assert len(DATA._clients) == 1, len(DATA._clients)
built = ClientDataCache().dataset(cfg.data, 4)  # the same tensors as building them
for pid, data in enumerate(got):
    own = built.client(pid, 4)
    assert data.train.x.equal(own.train.x) and data.test.y.equal(own.test.y), pid
print("ok")
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
