"""Clients with different datasets (tasks) in one federation: ``data.name_per_client``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

import client_app.app as client_module
from fml_flower.config import ConfigError, data_for_client, load_config
from fml_flower.data import check_client_datasets, federated_data
from tests.conftest import new_run_id


def _dataset(folder: Path, value: int, size: int = 8, n_train: int = 120) -> None:
    """A toy dataset whose every pixel is ``value``: tells the datasets apart."""
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", 40)):
        np.savez(
            folder / f"{split}.npz",
            x=np.full((n, size, size), value, dtype=np.uint8),
            y=np.arange(n) % 4,
        )


def _cfg(root: Path, **extra: object):
    return load_config(
        "base",
        {
            "data.source": "local",
            "data.root": str(root),
            "data.name": "digits",
            "data.partitioner": "iid",
            "data.mean": [0.0],
            "data.std": [1.0],
            "data.name_per_client": {1: "clothes", 3: "clothes"},
            **extra,
        },
    )


def test_clients_of_one_dataset_share_it(tmp_path: Path) -> None:
    _dataset(tmp_path / "digits", 10)
    _dataset(tmp_path / "clothes", 200)
    d = _cfg(tmp_path).data
    assert [data_for_client(d, pid, 5)[1:] for pid in range(5)] == [
        (0, 3),
        (0, 2),
        (1, 3),
        (1, 2),
        (2, 3),
    ]
    assert data_for_client(d, 3, 5)[0].name == "clothes"
    assert data_for_client(d, 4, 5)[0].name == "digits"


def test_each_client_trains_on_its_own_dataset(tmp_path: Path) -> None:
    _dataset(tmp_path / "digits", 10)
    _dataset(tmp_path / "clothes", 200)
    cfg = _cfg(tmp_path)
    cache = client_module.ClientDataCache()
    digits, _ = cache.get(cfg, 0, 4, None)
    clothes, _ = cache.get(cfg, 1, 4, None)
    assert float(digits.train.x.max()) == pytest.approx(10 / 255)
    assert float(clothes.train.x.min()) == pytest.approx(200 / 255)
    assert len(clothes.train) + len(clothes.test) == 60  # half of 120: 2 clothes clients


def test_a_node_can_name_its_own_dataset(tmp_path: Path) -> None:
    _dataset(tmp_path / "digits", 10)
    _dataset(tmp_path / "clothes", 200)
    cfg = _cfg(tmp_path, **{"data.name_per_client": {}})
    ctx = Context(
        run_id=new_run_id(),
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 2, "data-name": "clothes"},
        state=RecordDict(),
        run_config={},
    )
    assert client_module.node_overrides(cfg, ctx).data.name == "clothes"
    bad = Context(
        1, 1, {"partition-id": 0, "num-partitions": 2, "data-name": "nope"}, RecordDict(), {}
    )
    with pytest.raises(ConfigError, match="nope"):
        client_module.node_overrides(cfg, bad)


def test_server_checks_every_dataset_before_training(tmp_path: Path) -> None:
    _dataset(tmp_path / "digits", 10)
    _dataset(tmp_path / "clothes", 200)
    _dataset(tmp_path / "big", 1, size=12)
    cfg = _cfg(tmp_path)
    central = federated_data(cfg.data, 4)
    reports = check_client_datasets(cfg.data, 4, central)
    assert sorted(reports) == ["clothes", "digits"] and sum(reports["clothes"].sizes) == 120
    with pytest.raises(ConfigError, match=r"partition ids \[3\] but only 3 clients"):
        check_client_datasets(cfg.data, 3, federated_data(cfg.data, 3))
    other = _cfg(tmp_path, **{"data.name_per_client": {1: "big"}}).data
    with pytest.raises(ConfigError, match="'big' has inputs"):
        check_client_datasets(other, 4, central)
    with pytest.raises(ConfigError, match=r"data\.name_per_client\.1"):
        _cfg(tmp_path, **{"data.name_per_client": {1: "missing"}})


def test_task_heads_never_leave_their_clients(tmp_path: Path) -> None:
    """Digits and clothes clients share the meme body; each keeps its own head."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType

    from client_app.state import node_slot
    from fml_flower.models import build_model, matching_keys
    from fml_flower.personal import MEME_PRIVATE
    from fml_flower.settings import RoundSettings

    _dataset(tmp_path / "digits", 10)
    _dataset(tmp_path / "clothes", 200)
    head_pattern = ["^net[.]5[.]"]  # the mlp's last layer
    run_config = {
        "experiment": "base",
        "data.source": "local",
        "data.root": str(tmp_path),
        "data.name": "digits",
        "data.partitioner": "iid",
        "data.mean": "[0.0]",
        "data.std": "[1.0]",
        "data.name_per_client": "{1: clothes, 3: clothes}",
        "model.meme": "mlp",
        "model.local": "mlp",
        "model.private_patterns": str(head_pattern),
    }
    meme = build_model("mlp", (1, 8, 8), 4, seed=0)
    head = set(matching_keys(meme, head_pattern))
    body = ArrayRecord({k: v for k, v in meme.state_dict().items() if k not in head})
    config = ConfigRecord(RoundSettings(lr=0.1, alpha=0.5, beta=0.5).to_config())
    kept = {}
    for pid in (0, 1):  # a digits client and a clothes client
        ctx = Context(1, pid, {"partition-id": pid, "num-partitions": 4}, RecordDict(), run_config)
        msg = Message(RecordDict({"arrays": body, "config": config}), pid, MessageType.TRAIN)
        reply = client_module.train(msg, ctx)
        assert set(reply.content["arrays"].keys()) == set(body.keys())  # no head array
        saved = node_slot(ctx.state, MEME_PRIVATE)
        assert saved is not None
        kept[pid] = saved.state
        assert set(kept[pid]) == head
    assert not torch.equal(kept[0]["net.5.weight"], kept[1]["net.5.weight"])  # own tasks
