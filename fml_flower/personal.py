"""What a client keeps between rounds: its personalized model and optimizer state.

Plain PyTorch. A :class:`PersonalStore` holds named *slots* (``"personal"``: the
personalized model; ``"meme-private"``: FML's private meme part), each a
:class:`SavedModel`. The Flower adapter (:class:`client_app.state.ContextStore`) keeps them
in a node's ``context.state`` and on its disk; :class:`MemoryStore` keeps them in a dict.

Restoring is strict: a saved model is only loaded into a model of the same architecture
(same state-dict keys, shapes and dtypes), and the optimizer gets back its *state*
(momentum buffers) but keeps the hyper-parameters (learning rate, momentum, weight
decay) it was just built with, so a decayed learning rate sent by the server is never
overwritten by an old one.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

PERSONAL = "personal"
"""Slot of the personalized model (and its optimizer)."""
MEME_PRIVATE = "meme-private"
"""Slot of the meme's private part (FML with private meme keys)."""


SCRATCH = "fml-flower-state"
"""Folder under the system's temporary directory for runs that configure no state folder."""


def run_scratch_dir(run_id: int) -> Path:
    """The folder of run ``run_id``'s client state when no state folder is configured
    (the ServerApp removes it when the run ends).
    """
    return Path(tempfile.gettempdir()) / SCRATCH / f"run-{run_id}"


def run_state_dir(state_dir: str, run_id: int) -> Path:
    """The state folder of a node that configures none of its own: ``state_dir``
    (``federation.state_dir``) if given, else :func:`run_scratch_dir`.
    """
    return Path(state_dir).expanduser() if state_dir else run_scratch_dir(run_id)


class ArchitectureMismatch(RuntimeError):
    """A saved model does not fit the model it should be loaded into."""


@dataclass(frozen=True)
class SavedModel:
    """A model's state dict, its optimizer's state and what identifies its architecture."""

    state: dict[str, torch.Tensor]
    optimizer: bytes
    """``torch.save`` of the optimizer's ``state_dict()`` (empty: no optimizer)."""
    signature: str
    """:func:`architecture_signature` of the model."""
    arch: str = ""
    """The architecture's name, if known (for messages)."""
    rounds_trained: int = 0


class PersonalStore(Protocol):
    """Where a client's slots live between rounds."""

    def load(self, slot: str) -> SavedModel | None:
        """The saved model of ``slot``, or None if there is none yet."""
        ...

    def save(self, slot: str, saved: SavedModel) -> None:
        """Keep ``saved`` in ``slot`` (replacing what was there)."""
        ...


class MemoryStore:
    """A :class:`PersonalStore` in a dict (for tests and single-process use)."""

    def __init__(self) -> None:
        self.slots: dict[str, SavedModel] = {}

    def load(self, slot: str) -> SavedModel | None:
        """The saved model of ``slot``, or None."""
        return self.slots.get(slot)

    def save(self, slot: str, saved: SavedModel) -> None:
        """Keep ``saved`` in ``slot``."""
        self.slots[slot] = saved


def architecture_signature(model: nn.Module | dict[str, torch.Tensor]) -> str:
    """A short hash of the state-dict keys, shapes and dtypes: equal for the same
    architecture, different for another.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    text = ";".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in sorted(state.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached, contiguous CPU copy of ``model``'s state dict (whatever the model's
    memory format).
    """
    return {
        k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
        for k, v in model.state_dict().items()
    }


class NonFiniteModel(FloatingPointError):
    """A model to be kept holds NaN or Inf."""


def save_model(
    store: PersonalStore,
    slot: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    arch: str = "",
) -> SavedModel:
    """Keep ``model`` (parameters and buffers) and ``optimizer``'s state in ``slot``;
    counts the rounds the slot has been trained.

    Raises :class:`NonFiniteModel` (and stores nothing: the slot keeps its last version)
    when a floating value of ``model`` is NaN or infinite.
    """
    state = cpu_state(model)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteModel(
            f"the {slot} model became NaN/Inf in training ({len(bad)} arrays, e.g. "
            f"'{bad[0]}'), most likely because the received global model is corrupt (e.g. "
            "a poisoned aggregate); it is not stored: the version of its last good round is "
            "kept"
        )
    previous = store.load(slot)
    blob = b""
    if optimizer is not None:
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        blob = buffer.getvalue()
    saved = SavedModel(
        state=state,
        optimizer=blob,
        signature=architecture_signature(model),
        arch=arch or (previous.arch if previous else ""),
        rounds_trained=(previous.rounds_trained if previous else 0) + 1,
    )
    store.save(slot, saved)
    return saved


def load_model(
    store: PersonalStore,
    slot: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    strict: bool = True,
) -> bool:
    """Load ``slot`` into ``model`` (and its optimizer state into ``optimizer``).

    Returns False when the slot is empty (a client's first round). The optimizer keeps the
    hyper-parameters it was built with (``lr``, ``momentum``, ``weight_decay``, ...): only
    its state (momentum buffers) is restored. ``strict=False`` loads a partial state (a
    private part) into a larger model.

    Raises
    ------
    ArchitectureMismatch
        The saved model was made for another architecture: silently starting fresh would
        throw away the client's training.
    """
    saved = store.load(slot)
    if saved is None:
        return False
    if strict and saved.signature != architecture_signature(model):
        raise ArchitectureMismatch(
            f"the saved '{slot}' model{_named(saved.arch)} has another architecture "
            f"(state-dict keys/shapes) than the model this client built "
            f"({type(model).__name__}); refusing to replace it"
        )
    model.load_state_dict(saved.state, strict=strict)
    if optimizer is not None and saved.optimizer:
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        state = torch.load(io.BytesIO(saved.optimizer), map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state)
        for group, values in zip(optimizer.param_groups, hyper, strict=True):
            group.update(values)  # the caller's hyper-parameters, not the stored ones
    return True


def _named(arch: str) -> str:
    return f" (a '{arch}')" if arch else ""
