"""Data sources behind one interface, partitioners' class structure, bad files."""

from __future__ import annotations

import re
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from fml_flower.config import ConfigError, DataConfig, load_config
from fml_flower.data import (
    check_coverage,
    federated_data,
    load_embedded,
    partition_indices,
    split_report,
)
from tests.conftest import shared_dataset


def _labels(n_per_class: int = 60, classes: int = 10) -> np.ndarray:
    return np.repeat(np.arange(classes), n_per_class)


def _write_npz_dataset(folder: Path, n_train: int = 200, n_test: int = 50, rgb: bool = False):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shape = (8, 8, 3) if rgb else (8, 8)
    for split, n in (("train", n_train), ("test", n_test)):
        np.savez(
            folder / f"{split}.npz",
            x=rng.integers(0, 256, (n, *shape), dtype=np.uint8),
            y=np.arange(n) % 4,
        )


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_gives_k_classes_per_client(k: int) -> None:
    cfg = DataConfig(partitioner="pathological", classes_per_client=k)
    labels = _labels()
    for pid in range(5):
        tr, te = partition_indices(labels, cfg, 5, pid)
        classes = set(labels[tr]) | set(labels[te])
        assert len(classes) == k
        assert set(labels[te]) <= set(labels[tr])
        assert not set(tr) & set(te)


def test_iid_clients_see_all_classes_and_disjoint_data() -> None:
    cfg = DataConfig(partitioner="iid")
    labels = _labels()
    parts = [partition_indices(labels, cfg, 4, pid) for pid in range(4)]
    all_idx = np.concatenate([np.concatenate(p) for p in parts])
    assert len(all_idx) == len(set(all_idx.tolist())) == len(labels)
    for tr, _ in parts:
        assert len(set(labels[tr])) == 10


def test_dirichlet_is_skewed_and_seeded() -> None:
    cfg = DataConfig(partitioner="dirichlet", dirichlet_alpha=0.1, min_partition_size=5)
    labels = _labels(100)
    a = [partition_indices(labels, cfg, 5, pid)[0] for pid in range(5)]
    b = [partition_indices(labels, cfg, 5, pid)[0] for pid in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    top_share = [np.bincount(labels[tr], minlength=10).max() / len(tr) for tr in a]
    assert np.mean(top_share) > 0.4  # IID would give about 0.1


def test_client_split_is_80_20() -> None:
    tr, te = partition_indices(_labels(), DataConfig(partitioner="iid"), 2, 0)
    assert len(te) == pytest.approx(0.2 * (len(tr) + len(te)), abs=1)


def test_train_cap_keeps_a_subset_of_the_train_part_and_the_whole_test_part() -> None:
    full_tr, full_te = partition_indices(_labels(), DataConfig(partitioner="iid"), 2, 0)
    capped = DataConfig(partitioner="iid", max_train_examples=50)
    tr, te = partition_indices(_labels(), capped, 2, 0)
    assert len(tr) == 50 < len(full_tr)
    assert set(tr) <= set(full_tr)
    assert np.array_equal(te, full_te)


def test_too_many_clients_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="clients for 40 training examples"):
        partition_indices(_labels(4), DataConfig(partitioner="iid"), 41, 0)
    federated = federated_data(DataConfig(), 2)
    with pytest.raises(ConfigError, match="cannot split 4000 examples over 3000 clients"):
        federated.split_report(3000)
    federated = federated_data(DataConfig(partitioner="iid"), 2)
    with pytest.raises(ConfigError, match=r"partition \d+ has 1 example.*too many clients"):
        federated.split_report(3000)


def test_more_classes_per_client_than_classes() -> None:
    with pytest.raises(ConfigError, match="classes_per_client: 11 exceeds the 10 classes"):
        partition_indices(_labels(), DataConfig(classes_per_client=11), 5, 0)


def test_embedded_default_is_real_mnist_5k() -> None:
    train, test = load_embedded("mnist5k", 42)
    assert train.x.shape == (4000, 28, 28) and test.x.shape == (1000, 28, 28)
    assert np.bincount(test.y).tolist() == [100] * 10
    data = federated_data(load_config().data, 10)
    assert data.info.input_shape == (1, 28, 28) and data.info.num_classes == 10
    assert data.info.mean[0] == pytest.approx(0.1307, abs=0.005)
    client = data.client(3, 10)
    assert client.train.x.dtype.is_floating_point and client.train.x.shape[1:] == (1, 28, 28)
    assert len(set(client.train.y.tolist())) == 2


def test_local_npz_folder(tmp_path: Path) -> None:
    _write_npz_dataset(tmp_path / "toy", rgb=True)
    np.savez(
        tmp_path / "toy" / "train_extra.npz",
        x=np.zeros((20, 8, 8, 3), np.uint8),
        y=np.zeros(20, np.int64),
    )
    cfg = DataConfig(source="local", root=str(tmp_path), name="toy", partitioner="iid")
    data = federated_data(cfg, 2)
    assert data.info.input_shape == (3, 8, 8) and data.info.num_classes == 4
    assert sum(data.split_report(2).sizes) == 220  # train + train_extra
    assert data.central_test().x.shape == (50, 3, 8, 8)


def _write_parquet(path: Path, n: int) -> None:
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)) for _ in range(n)]
    ds = datasets.Dataset.from_dict(
        {"image": images, "label": [i % 3 for i in range(n)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    ds.to_parquet(str(path))


def test_local_parquet_folder(tmp_path: Path) -> None:
    (tmp_path / "pq").mkdir()
    _write_parquet(tmp_path / "pq" / "train.parquet", 90)
    _write_parquet(tmp_path / "pq" / "test.parquet", 30)
    cfg = DataConfig(source="local", root=str(tmp_path), name="pq", partitioner="iid")
    data = federated_data(cfg, 3)
    assert data.info.input_shape == (1, 8, 8)
    assert len(data.client(1, 3).train) + len(data.client(1, 3).test) == 30


def test_huggingface_path_through_federated_dataset(tmp_path: Path) -> None:
    """The hub code path (FederatedDataset), fed a local parquet builder: the hub is offline."""
    _write_parquet(tmp_path / "train.parquet", 120)
    _write_parquet(tmp_path / "test.parquet", 30)
    cfg = DataConfig(
        source="huggingface",
        name="parquet",
        partitioner="pathological",
        classes_per_client=1,
        data_files={
            "train": str(tmp_path / "train.parquet"),
            "test": str(tmp_path / "test.parquet"),
        },
    )
    data = federated_data(cfg, 3)
    assert data.central_test().x.shape == (30, 1, 8, 8)
    client = data.client(2, 3)
    assert len(set(client.train.y.tolist())) == 1
    assert data.split_report(3) is None


def test_missing_split_file_is_named(tmp_path: Path) -> None:
    _write_npz_dataset(tmp_path / "toy")
    (tmp_path / "toy" / "test.npz").unlink()
    cfg = DataConfig(source="local", root=str(tmp_path), name="toy")
    with pytest.raises(FileNotFoundError, match=r"no test.npz or test.parquet in"):
        federated_data(cfg, 2)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a zip at all", "not a readable .npz archive"),
        (None, r"missing arrays \['y'\]"),
    ],
)
def test_malformed_npz_is_named(tmp_path: Path, content: bytes | None, message: str) -> None:
    _write_npz_dataset(tmp_path / "toy")
    bad = tmp_path / "toy" / "train.npz"
    if content is None:
        np.savez(bad, x=np.zeros((4, 8, 8), np.uint8))
    else:
        bad.write_bytes(content)
    cfg = DataConfig(source="local", root=str(tmp_path), name="toy")
    with pytest.raises(ValueError, match=message):
        federated_data(cfg, 2)


def test_labels_and_images_must_agree(tmp_path: Path) -> None:
    _write_npz_dataset(tmp_path / "toy")
    np.savez(tmp_path / "toy" / "test.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.zeros(3))
    cfg = DataConfig(source="local", root=str(tmp_path), name="toy")
    with pytest.raises(ValueError, match="4 images but labels of shape"):
        federated_data(cfg, 2)


def test_shared_mnist_p1_partition() -> None:
    folder = shared_dataset("mnist")
    cfg = DataConfig(source="local", root=str(folder.parent), name="mnist")
    data = federated_data(cfg, 20)
    assert len(data.central_test()) == 10_000
    report = data.split_report(20)
    assert sum(report.sizes) == 60_000
    assert report.missing_classes() == []
    client = data.client(7, 20)
    assert len(set(client.train.y.tolist())) == 2


@pytest.mark.slow
def test_shared_cifar10_joins_both_train_files() -> None:
    folder = shared_dataset("cifar10")
    cfg = DataConfig(source="local", root=str(folder.parent), name="cifar10", partitioner="iid")
    data = federated_data(cfg, 10)
    assert data.info.input_shape == (3, 32, 32)
    assert sum(data.split_report(10).sizes) == 50_000


def test_pathological_with_5_clients_leaves_classes_out_and_the_run_stops() -> None:
    """The case that broke P3: first-deterministic, 5 clients x 2 classes of 10."""
    cfg = DataConfig(partitioner="pathological", classes_per_client=2)
    labels = _labels(100)
    report = split_report(labels, cfg, 5)
    missing = report.missing_classes()
    assert missing  # some classes reach no client
    assert all(report.class_counts[p].get(c, 0) == 0 for p in range(5) for c in missing)
    with pytest.raises(ConfigError, match=re.escape(f"classes {missing} of 'toy' reach no")):
        check_coverage(report, cfg, 5, "toy")
    allowed = DataConfig(partitioner="pathological", allow_missing_classes=True)
    check_coverage(report, allowed, 5, "toy")  # allowed on purpose: no error


def test_shards_give_every_class_to_someone_and_about_two_per_client() -> None:
    cfg = DataConfig(partitioner="shard", shards_per_client=2)
    labels = _labels(100)
    report = split_report(labels, cfg, 5)
    assert report.missing_classes() == []
    assert sum(report.sizes) == len(labels)  # every example is used
    assert all(1 <= len(c) <= 3 for c in report.class_counts)  # a shard may straddle classes
    check_coverage(report, cfg, 5, "toy")


def test_split_report_counts_and_hashes_are_those_of_the_clients_parts() -> None:
    cfg = DataConfig(partitioner="dirichlet", dirichlet_alpha=0.5, min_partition_size=5)
    labels = _labels(100)
    report = split_report(labels, cfg, 4)
    for pid in range(4):
        tr, te = partition_indices(labels, cfg, 4, pid)
        counts = np.bincount(labels[tr], minlength=10)
        assert report.class_counts[pid] == {c: int(n) for c, n in enumerate(counts) if n}
        assert report.sizes[pid] == len(tr) + len(te)
    other = split_report(labels, DataConfig(partitioner="dirichlet", seed=43), 4)
    assert report.split_hashes != other.split_hashes
    assert report.split_hashes == split_report(labels, cfg, 4).split_hashes


def test_shared_mnist_p3_first_deterministic_misses_5_and_9() -> None:
    folder = shared_dataset("mnist")
    cfg = DataConfig(source="local", root=str(folder.parent), name="mnist")
    report = federated_data(cfg, 5).split_report(5)
    assert report.missing_classes() == [5, 9]
    shards = DataConfig(source="local", root=str(folder.parent), name="mnist", partitioner="shard")
    assert federated_data(shards, 5).split_report(5).missing_classes() == []
