"""Keep a client's personalized model and its optimizer in Flower's ``context.state``.

``context.state`` persists per node across the rounds of a run (and travels with every
message in simulation), so it holds only what must persist: the model's state dict
(an ArrayRecord), the optimizer's state (momentum buffers, serialized with
``torch.save``) and a little metadata to refuse a mismatched model.
"""

from __future__ import annotations

import io

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from torch import nn

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
