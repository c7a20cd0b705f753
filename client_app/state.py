"""A client's slots (:mod:`fml_flower.personal`) in Flower's ``context.state`` and on disk.

``context.state`` persists per node across the rounds of a run (and travels with every
message in simulation), so it holds only what must persist: each slot's state dict (an
ArrayRecord) and a ConfigRecord with its optimizer state (``torch.save`` bytes), its
architecture signature and name, and how many rounds it has been trained.

With a node-local ``state-dir`` (node config), the personalized model is also written to
disk after every round (atomically, checksummed) and read back when ``context.state`` is
empty (a new run, a restarted SuperNode), so a client never loses it.
"""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fml_flower.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fml_flower.personal import PERSONAL, SavedModel, architecture_signature


def _keys(slot: str) -> tuple[str, str]:
    return f"fml.{slot}.model", f"fml.{slot}.meta"


class ContextStore:
    """A :class:`~fml_flower.personal.PersonalStore` over a node's ``context.state``."""

    def __init__(self, state: RecordDict) -> None:
        self.state = state

    def has(self, slot: str = PERSONAL) -> bool:
        """Whether ``slot`` holds a model."""
        return _keys(slot)[0] in self.state

    def load(self, slot: str) -> SavedModel | None:
        """The saved model of ``slot``, or None."""
        model_key, meta_key = _keys(slot)
        if model_key not in self.state:
            return None
        meta = self.state[meta_key]
        return SavedModel(
            state=self.state[model_key].to_torch_state_dict(),
            optimizer=bytes(meta["optimizer"]),  # type: ignore[arg-type]
            signature=str(meta["signature"]),
            arch=str(meta["arch"]),
            rounds_trained=int(meta["rounds_trained"]),  # type: ignore[arg-type]
        )

    def save(self, slot: str, saved: SavedModel) -> None:
        """Keep ``saved`` in ``slot``."""
        model_key, meta_key = _keys(slot)
        self.state[model_key] = ArrayRecord(saved.state)
        self.state[meta_key] = ConfigRecord(
            {
                "optimizer": saved.optimizer,
                "signature": saved.signature,
                "arch": saved.arch,
                "rounds_trained": saved.rounds_trained,
            }
        )


# --------------------------------------------------------------- durable copy on disk


def personal_file(state_dir: Path, partition_id: int) -> Path:
    """The node-local file holding the personalized model of ``partition_id``."""
    return state_dir / f"personal-p{partition_id}.ckpt"


def previous_file(state_dir: Path, partition_id: int) -> Path:
    """The version of :func:`personal_file` written one round before."""
    return state_dir / f"personal-p{partition_id}.prev.ckpt"


def persist_personal(
    store: ContextStore,
    state_dir: Path,
    partition_id: int,
    identity: dict[str, str],
    round_: int | None = None,
) -> Path | None:
    """Write the personalized model held in ``store`` to ``state_dir`` atomically.

    ``identity`` (e.g. the method and the data split) is stored with it and must match
    when the model is restored; ``round_`` is the (absolute) round it was trained in. The
    file it replaces is kept as :func:`previous_file` (one round back: what a run resumed
    from the server's last checkpoint needs when the SuperLink died after this client had
    already finished the next round). Returns None if there is no personalized model.
    """
    saved = store.load(PERSONAL)
    if saved is None:
        return None
    payload = {
        "identity": dict(identity),
        "model": saved.state,
        "optimizer": saved.optimizer,
        "arch": saved.arch,
        "rounds_trained": saved.rounds_trained,
        "partition_id": partition_id,
        "round": round_,
    }
    path = personal_file(state_dir, partition_id)
    if path.exists():
        os.replace(path, previous_file(state_dir, partition_id))  # atomic; then the new one
    save_checkpoint(path, payload)
    return path


def restore_from_disk(
    store: ContextStore,
    state_dir: Path,
    partition_id: int,
    arch: str,
    identity: dict[str, str],
    at_most_round: int | None = None,
) -> bool:
    """Put the personalized model saved in ``state_dir`` into an empty ``store``.

    ``at_most_round`` (a resumed run: the last round the server's checkpoint holds, for
    a training message) picks the newest saved version trained in that round or before,
    so that a client that had finished one more round than the server recorded continues
    from exactly where the server does. ``None``: the newest version.

    Returns False when there is no file (a client's first round ever). A corrupt file,
    or one saved for another partition, architecture or run identity (method, data split),
    or no version old enough, raises :class:`CheckpointError` instead of letting the client
    start afresh or mix runs.
    """
    path = personal_file(state_dir, partition_id)
    if not path.exists():
        prev = previous_file(state_dir, partition_id)
        if not prev.exists():
            return False
        path = prev  # a crash between keeping the old version and writing the new one
    payload = load_checkpoint(path)
    if at_most_round is not None and (payload.get("round") or 0) > at_most_round:
        prev = previous_file(state_dir, partition_id)
        older = load_checkpoint(prev) if prev.exists() and prev != path else None
        if older is None or (older.get("round") or 0) > at_most_round:
            also = "" if older is None else f" (and {prev.name} of round {older.get('round')})"
            raise CheckpointError(
                f"{path}: holds the personalized model of round {payload.get('round')}{also}, "
                f"but this run resumes after round {at_most_round}: no saved version is "
                "old enough (resume from a later checkpoint, or use another state-dir)"
            )
        path, payload = prev, older
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
    store.save(
        PERSONAL,
        SavedModel(
            state=payload["model"],
            optimizer=payload["optimizer"],
            signature=architecture_signature(payload["model"]),
            arch=arch,
            rounds_trained=int(payload["rounds_trained"]),
        ),
    )
    return True
