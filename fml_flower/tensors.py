"""Ready-to-train tensors of one client, and a node-local cache of them.

This module imports only torch: a ClientApp whose partition is cached never imports the
dataset libraries (``datasets``, ``flwr_datasets``, PIL), which matters in deployment, where
Flower starts a new ClientApp process for every message.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fml_flower.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fml_flower.config import DataConfig, to_yaml


@dataclass(frozen=True)
class TensorSplit:
    """Ready-to-train tensors: ``x`` float32 ``(N, C, H, W)`` normalized, ``y`` int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device) -> TensorSplit:
        """The same split on ``device``."""
        return TensorSplit(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class ClientData:
    """One client's own train and test parts."""

    train: TensorSplit
    test: TensorSplit

    def to(self, device: torch.device) -> ClientData:
        """Both parts on ``device``."""
        return ClientData(self.train.to(device), self.test.to(device))


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about the data."""

    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class PreparedData:
    """What the server keeps of a federation's data once it is checked: the inputs'
    description, each dataset's split record (class counts and hashes per client) and the
    central test set.
    """

    info: DatasetInfo
    split: dict[str, dict | None]
    central: TensorSplit


def partition_fingerprint(data: DataConfig, partition_id: int, num_partitions: int) -> str:
    """What a client's ready tensors depend on: the data settings and the partition (and,
    for a local folder, its files' names, sizes and times).
    """
    parts = [to_yaml(data), f"partition {partition_id} of {num_partitions}"]  # type: ignore[arg-type]
    if data.source == "local":
        folder = Path(data.root).expanduser() / data.name
        for f in sorted(folder.glob("*")):
            if f.is_file():
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


def partition_cache_file(folder: Path, fingerprint: str, partition_id: int) -> Path:
    """Where a node keeps the ready tensors of ``partition_id`` for one data setting."""
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    return folder / f"partition-p{partition_id}-{digest}.pt"


def save_partition(path: Path, data: ClientData, info: DatasetInfo, fingerprint: str) -> None:
    """Write a client's ready tensors (atomically, with a checksum) to ``path``."""
    save_checkpoint(
        path,
        {
            "fingerprint": fingerprint,
            "train_x": data.train.x.cpu(),
            "train_y": data.train.y.cpu(),
            "test_x": data.test.x.cpu(),
            "test_y": data.test.y.cpu(),
            "info": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(info).items()},
        },
    )


def load_partition(path: Path, fingerprint: str) -> tuple[ClientData, DatasetInfo] | None:
    """The cached tensors at ``path``, or None when there is no file.

    A file that is corrupt or was written for another data setting raises
    :class:`~fml_flower.checkpoint.CheckpointError` naming it: a cache is never trusted
    blindly, and a bad one is not silently rebuilt over.
    """
    if not path.is_file():
        return None
    payload = load_checkpoint(path)
    if payload.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path}: cached partition of another data setting; delete the file to rebuild it"
        )
    i = payload["info"]
    info = DatasetInfo(
        tuple(i["input_shape"]), int(i["num_classes"]), tuple(i["mean"]), tuple(i["std"])
    )
    data = ClientData(
        TensorSplit(payload["train_x"], payload["train_y"]),
        TensorSplit(payload["test_x"], payload["test_y"]),
    )
    return data, info
