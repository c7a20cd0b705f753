"""What the performance work must not change: results, errors, and Flower's contract."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import client_app.app as client_module
from fml_flower.checkpoint import CheckpointError
from fml_flower.config import ConfigError, load_config
from fml_flower.models import build_model
from fml_flower.tensors import (
    ClientData,
    DatasetInfo,
    TensorSplit,
    load_partition,
    partition_cache_file,
    save_partition,
)
from fml_flower.training import EpochStats, mutual_learning_epoch, sgd
from server_app.grid import PollingGrid
from tools.bench import floor_epoch, our_epoch


def test_the_benchmark_floor_does_exactly_our_epochs_work() -> None:
    """Floor and our code path start equal and must end with identical weights."""
    torch.manual_seed(0)
    x, y = torch.randn(96, 1, 28, 28), torch.randint(0, 10, (96,))
    local0 = build_model("cnn", (1, 28, 28), 10, seed=1)
    meme0 = build_model("mlp", (1, 28, 28), 10, seed=2)
    runs = {}
    for name, loop in (("floor", floor_epoch), ("ours", our_epoch)):
        local, meme = copy.deepcopy(local0), copy.deepcopy(meme0)
        loop(local, meme, x, y, 32, 0.5, 0.3, 0.05, torch.Generator().manual_seed(7))
        runs[name] = (local.state_dict(), meme.state_dict())
    for a, b in zip(runs["floor"], runs["ours"], strict=True):
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert not torch.equal(
        runs["ours"][0]["classifier.3.weight"], local0.state_dict()["classifier.3.weight"]
    )


def test_epoch_stats_are_the_per_example_means() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(70, 1, 28, 28), torch.randint(0, 10, (70,))
    local = build_model("mlp", (1, 28, 28), 10, seed=1)
    meme = build_model("mlp", (1, 28, 28), 10, seed=2)
    stats = mutual_learning_epoch(
        local, meme, sgd(local, 0.0, 0, 0), sgd(meme, 0.0, 0, 0), (x, y), 32, 0.5, 0.5
    )  # lr 0: the models do not move, so the means can be recomputed on the whole set
    m = stats.means()
    with torch.no_grad():
        acc_local = (local(x).argmax(1) == y).float().mean().item()
        acc_meme = (meme(x).argmax(1) == y).float().mean().item()
    assert stats.examples == 70
    assert m["train_acc_local"] == pytest.approx(acc_local)
    assert m["train_acc_meme"] == pytest.approx(acc_meme)
    assert m["train_loss_local"] > 0 and m["train_loss_meme"] > 0
    assert EpochStats().means()["train_loss_local"] == 0.0


def _data(n: int = 8) -> tuple[ClientData, DatasetInfo]:
    split = TensorSplit(torch.randn(n, 1, 4, 4), torch.arange(n) % 3)
    return ClientData(split, TensorSplit(split.x[:2].clone(), split.y[:2].clone())), DatasetInfo(
        (1, 4, 4), 3, (0.5,), (0.25,)
    )


def test_partition_cache_round_trip_and_refusals(tmp_path) -> None:
    data, info = _data()
    path = partition_cache_file(tmp_path, "setting A", 3)
    assert load_partition(path, "setting A") is None
    save_partition(path, data, info, "setting A")
    loaded, loaded_info = load_partition(path, "setting A")
    assert torch.equal(loaded.train.x, data.train.x) and torch.equal(loaded.test.y, data.test.y)
    assert loaded_info == info
    other = tmp_path / "other.pt"
    path.rename(other)
    with pytest.raises(CheckpointError, match="another data setting"):
        load_partition(other, "setting B")
    other.write_bytes(other.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_partition(other, "setting A")


def test_a_node_with_a_state_dir_partitions_its_data_once(tmp_path, monkeypatch) -> None:
    cfg = load_config("base", {})
    first, info = client_module.ClientDataCache().get(cfg, 1, 10, tmp_path)
    assert len(list(tmp_path.glob("partition-p1-*.pt"))) == 1

    def no_partitioning(*args: object) -> None:
        raise AssertionError("the cached partition was not used")

    import fml_flower.data

    monkeypatch.setattr(fml_flower.data, "federated_data", no_partitioning)
    # a new ClientApp process: a new cache, which must read the partition from disk
    again, info_again = client_module.ClientDataCache().get(cfg, 1, 10, tmp_path)
    assert torch.equal(first.train.x, again.train.x) and info == info_again


class _FakeGrid:
    """Replies become available after ``ready_after`` pulls."""

    def __init__(self, ready_after: int, ids: list[str]):
        self.ready_after, self.ids, self.pulls = ready_after, ids, 0

    def push_messages(self, messages: object) -> list[str]:
        return list(self.ids)

    def pull_messages(self, message_ids: object) -> list[SimpleNamespace]:
        self.pulls += 1
        if self.pulls < self.ready_after:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in self.ids]

    def get_node_ids(self) -> list[int]:
        return [1, 2]


def test_polling_grid_collects_replies_and_respects_the_timeout() -> None:
    fake = _FakeGrid(ready_after=3, ids=["a", "b"])
    grid = PollingGrid(fake, interval=0.001)  # type: ignore[arg-type]
    replies = list(grid.send_and_receive([]))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert fake.pulls == 3
    assert list(grid.get_node_ids()) == [1, 2]
    late = PollingGrid(_FakeGrid(ready_after=10**9, ids=["a"]), interval=0.001)  # type: ignore[arg-type]
    assert list(late.send_and_receive([], timeout=0.02)) == []
    with pytest.raises(ValueError, match="poll interval"):
        PollingGrid(fake, interval=0)  # type: ignore[arg-type]


def test_poll_interval_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"federation\.poll_interval"):
        load_config("base", {"federation.poll_interval": 0})


def test_bench_store_rewrites_only_its_section(tmp_path, monkeypatch) -> None:
    import tools.bench as bench

    doc = tmp_path / "performance.md"
    doc.write_text(f"# Reading before\n\n{bench.BEGIN}\nold table\n{bench.END}\n\nReading after\n")
    monkeypatch.setattr(bench, "DOC", doc)
    monkeypatch.setattr(bench, "STORE", tmp_path / "store")
    row = {"case": "toy", "samples": 10, "floor_sps": 100.0, "ours_sps": 97.0, "ratio": 0.97}
    bench.store("epoch", {"device": "cpu", "threads": 1, "rows": [row]}, "python -m x")
    text = doc.read_text()
    assert "old table" not in text and "| toy | 10 | - | 100 | 97 | 0.970 | - |" in text
    assert text.startswith("# Reading before") and text.rstrip().endswith("Reading after")
    doc.write_text("no markers")
    with pytest.raises(RuntimeError, match="markers"):
        bench.store("epoch", {"device": "cpu", "threads": 1, "rows": [row]}, "python -m x")
