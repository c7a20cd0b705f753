"""Keep a client's personalized model and its optimizer in Flower's ``context.state``.

``context.state`` persists per node across the rounds of a run (and travels with every
message in simulation), so it holds only what must persist: the model's state dict
(an ArrayRecord), the optimizer's state (momentum buffers, serialized with
``torch.save``) and a little metadata to refuse a mismatched model.

With a node-local ``state-dir`` (node config), the same is also written to disk after
every round and read back when ``context.state`` is empty (a new run, a restarted
SuperNode), so a client never loses its personalized model.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from torch import nn

from fml_flower.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fml_flower.models import cpu_state_dict

MODEL_KEY = "fml.personal.model"
OPTIMIZER_KEY = "fml.personal.optimizer"
META_KEY = "fml.personal.meta"


def has_personal_model(context: Context) -> bool:
    """Whether this node already holds a personalized model."""
    return MODEL_KEY in context.state


def save_personal(
    context: Context, model: nn.Module, optimizer: torch.optim.Optimizer | None, arch: str
) -> None:
    """Store ``model`` (parameters and buffers) and ``optimizer``'s state in the context."""
    rounds = int(context.state[META_KEY]["rounds_trained"]) if META_KEY in context.state else 0
    context.state[MODEL_KEY] = ArrayRecord(cpu_state_dict(model))
    if optimizer is not None:
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        context.state[OPTIMIZER_KEY] = ConfigRecord({"state": buffer.getvalue()})
    context.state[META_KEY] = ConfigRecord({"arch": arch, "rounds_trained": rounds + 1})


def load_personal(
    context: Context, model: nn.Module, optimizer: torch.optim.Optimizer | None, arch: str
) -> int:
    """Load the stored personalized model (and optimizer state) into ``model``.

    Returns the number of rounds it has been trained. Raises ``RuntimeError`` if the
    stored model was built for another architecture: silently starting fresh would
    throw away the client's training.
    """
    meta = context.state[META_KEY]
    if meta["arch"] != arch:
        raise RuntimeError(
            f"the stored personalized model is a '{meta['arch']}', but this client is "
            f"configured for '{arch}'; refusing to replace it"
        )
    model.load_state_dict(context.state[MODEL_KEY].to_torch_state_dict())
    if optimizer is not None and OPTIMIZER_KEY in context.state:
        blob = context.state[OPTIMIZER_KEY]["state"]
        optimizer.load_state_dict(
            torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        )  # type: ignore[arg-type]
    return int(meta["rounds_trained"])  # type: ignore[arg-type]


# --------------------------------------------------------------- durable copy on disk


def personal_file(state_dir: Path, partition_id: int) -> Path:
    """The node-local file holding the personalized model of ``partition_id``."""
    return state_dir / f"personal-p{partition_id}.ckpt"


def persist_personal(
    context: Context, state_dir: Path, partition_id: int, identity: dict[str, str]
) -> Path:
    """Write the personalized model held in ``context.state`` to ``state_dir`` atomically.

    ``identity`` (e.g. the method and the data split) is stored with it and must match
    when the model is restored.
    """
    meta = context.state[META_KEY]
    payload = {
        "identity": dict(identity),
        "model": context.state[MODEL_KEY].to_torch_state_dict(),
        "optimizer": context.state[OPTIMIZER_KEY]["state"]
        if OPTIMIZER_KEY in context.state
        else b"",
        "arch": meta["arch"],
        "rounds_trained": int(meta["rounds_trained"]),  # type: ignore[arg-type]
        "partition_id": partition_id,
    }
    path = personal_file(state_dir, partition_id)
    save_checkpoint(path, payload)
    return path


def restore_from_disk(
    context: Context, state_dir: Path, partition_id: int, arch: str, identity: dict[str, str]
) -> bool:
    """Put the personalized model saved in ``state_dir`` into an empty ``context.state``.

    Returns False when there is no file (a client's first round ever). A corrupt file,
    or one saved for another partition, architecture or run identity (method, data split),
    raises instead of letting the client start afresh or mix runs.
    """
    path = personal_file(state_dir, partition_id)
    if not path.exists():
        return False
    payload = load_checkpoint(path)
    if payload.get("partition_id") != partition_id:
        raise CheckpointError(
            f"{path}: saved for partition {payload.get('partition_id')}, this node is "
            f"partition {partition_id}"
        )
    if payload.get("arch") != arch:
        raise CheckpointError(
            f"{path}: holds a '{payload.get('arch')}' personalized model, this client is "
            f"configured for '{arch}'; refusing to replace it"
        )
    saved = payload.get("identity", {})
    for key, value in identity.items():
        if saved.get(key) != value:
            raise CheckpointError(
                f"{path}: saved by a run with {key} '{saved.get(key)}', this run has "
                f"'{value}'; refusing to mix them (give this run another state-dir to start "
                "fresh personalized models)"
            )
    context.state[MODEL_KEY] = ArrayRecord(payload["model"])
    if payload["optimizer"]:
        context.state[OPTIMIZER_KEY] = ConfigRecord({"state": payload["optimizer"]})
    context.state[META_KEY] = ConfigRecord(
        {"arch": arch, "rounds_trained": int(payload["rounds_trained"])}
    )
    return True
