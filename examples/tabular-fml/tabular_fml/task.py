"""The user's own task: models and data, plain PyTorch and scikit-learn (no Flower, no FML).

Data: scikit-learn's breast cancer dataset (569 samples, 30 features, 2 classes; it ships
inside the package, no download). Every client gets a label-skewed part of it (Dirichlet
over the labels, seeded), keeps 20 % of that part as its own test set, and standardizes
with the mean/std of its own training split (no statistic leaves the client).

Models: the shared *meme* model is a small MLP; the *personalized* model is deeper and
never leaves the client, so its architecture is the client's own business.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from torch import nn

MIN_PARTITION_SIZE = 20
TEST_FRACTION = 0.2


@lru_cache(maxsize=1)
def dataset() -> tuple[np.ndarray, np.ndarray]:
    """The whole dataset as ``(features float32 [n, d], labels int64 [n])``."""
    x, y = load_breast_cancer(return_X_y=True)
    return x.astype(np.float32), y.astype(np.int64)


def num_features() -> int:
    """Input width of the models."""
    return int(dataset()[0].shape[1])


def num_classes() -> int:
    """Number of labels."""
    return int(dataset()[1].max()) + 1


def meme_model() -> nn.Module:
    """The shared model (global on the server, meme on the clients): one hidden layer."""
    return nn.Sequential(nn.Linear(num_features(), 32), nn.ReLU(), nn.Linear(32, num_classes()))


def personal_model() -> nn.Module:
    """The private personalized model: deeper than the meme, never sent anywhere."""
    return nn.Sequential(
        nn.Linear(num_features(), 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes()),
    )


def partition_indices(
    labels: np.ndarray, partition_id: int, num_partitions: int, alpha: float, seed: int
) -> np.ndarray:
    """Indices of one client's part: per label, Dirichlet(alpha) shares over the clients.

    Seeded and identical in every process; redrawn (with the same seed sequence) until
    every part holds at least ``MIN_PARTITION_SIZE`` samples.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is not in [0, {num_partitions})")
    if num_partitions * MIN_PARTITION_SIZE > len(labels):
        raise ValueError(f"{num_partitions} partitions of {len(labels)} samples are too small")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_partitions)]
        for label in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet([alpha] * num_partitions)
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= MIN_PARTITION_SIZE:
            return np.sort(np.asarray(parts[partition_id], dtype=np.int64))
    raise RuntimeError(f"no split with {MIN_PARTITION_SIZE}+ samples per client; raise alpha")


@dataclass(frozen=True)
class ClientData:
    """One client's standardized train and test tensors."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@lru_cache(maxsize=8)
def load_data(partition_id: int, num_partitions: int, alpha: float, seed: int) -> ClientData:
    """This client's data (built once per process)."""
    x, y = dataset()
    idx = partition_indices(y, partition_id, num_partitions, alpha, seed)
    idx = np.random.default_rng(seed + 1 + partition_id).permutation(idx)
    n_test = max(1, round(TEST_FRACTION * len(idx)))
    test, train = idx[:n_test], idx[n_test:]
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0) + 1e-6
    scaled = (x - mean) / std
    return ClientData(
        torch.from_numpy(scaled[train]),
        torch.from_numpy(y[train]),
        torch.from_numpy(scaled[test]),
        torch.from_numpy(y[test]),
    )
