"""A client's slots (:mod:`fml_flower.personal`): node-local files, identified in
``context.state``.

:class:`NodeStore` is what the app's ClientApp uses, in simulation as in deployment: a
client's slots (its personalized model with its optimizer state, FML's private meme part)
live in one node-local checkpoint file, written atomically and checksummed after every
round it trains, and ``context.state`` holds only what identifies that file (its path, its
SHA-256, the round). Flower keeps ``context.state`` in memory for every node and, in
simulation, ships it with every message: with the models out of it, neither the server's
memory nor a message grows with the number of clients that have trained.

The folder is the node config's ``state-dir`` (durable: a new run or a restarted SuperNode
continues from it), else ``federation.state_dir`` (the same, for every node of a
simulation), else a folder for this run under the system's temporary directory (the
ServerApp removes it when the run ends: :func:`~fml_flower.personal.run_scratch_dir`).

:class:`ContextStore` keeps the slots in ``context.state`` itself: the plug-in functions of
:mod:`client_app.fml` take either.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fml_flower.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fml_flower.personal import PERSONAL, SavedModel, architecture_signature, run_scratch_dir


def _keys(slot: str) -> tuple[str, str]:
    return f"fml.{slot}.model", f"fml.{slot}.meta"


class ContextStore:
    """A :class:`~fml_flower.personal.PersonalStore` in a node's ``context.state``
    (Flower keeps it in memory, and ships it with every message in simulation; for many
    clients use :class:`NodeStore`).
    """

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


RECORD = "fml.node-store"
"""``context.state`` key of the ConfigRecord that identifies a node's state file."""


def _slot_entry(saved: SavedModel) -> dict[str, object]:
    return {
        "model": saved.state,
        # torch.load(weights_only=True) refuses an empty bytes object, not None
        "optimizer": saved.optimizer or None,
        "arch": saved.arch,
        "rounds_trained": saved.rounds_trained,
    }


def _slot_of(entry: dict) -> SavedModel:
    return SavedModel(
        state=entry["model"],
        optimizer=entry["optimizer"] or b"",
        signature=architecture_signature(entry["model"]),
        arch=str(entry.get("arch", "")),
        rounds_trained=int(entry.get("rounds_trained", 0)),
    )


class NodeStore:
    """A :class:`~fml_flower.personal.PersonalStore` in a node-local file, identified in
    ``context.state`` (see the module's docstring).

    The file (:func:`personal_file`) holds every slot, the run identity it was trained
    under (method, data split), the partition and the round. It is read at most once per
    message and written by :meth:`flush` after training; the version it replaces is kept
    as :func:`previous_file` (what a run resumed from the server's last checkpoint needs
    when the SuperLink died after this client had finished one more round).

    Parameters
    ----------
    state : RecordDict
        The node's ``context.state``: gets one small ConfigRecord (:data:`RECORD`) with the
        file's path, SHA-256 and round.
    folder : Path
        The node-local folder.
    partition_id : int
        This client's partition (its identity for the file name and the checks).
    identity : Optional[dict[str, str]] (default: None)
        Labels a saved file must carry for this run to continue it, e.g. ``{"method":
        "fml", "data split": "cifar10 dirichlet 0.5, 10 clients"}``: a file written under
        other labels is refused instead of mixing two experiments. None: no labels (the
        partition id and the model's architecture are still checked).
    keep_previous : bool (default: True)
        Keep the version one round back (:func:`previous_file`); a run's scratch folder,
        which no later run reads, does without it (half the disk).
    """

    def __init__(
        self,
        state: RecordDict,
        folder: Path,
        partition_id: int,
        identity: dict[str, str] | None = None,
        keep_previous: bool = True,
    ) -> None:
        self.state = state
        self.folder = Path(folder)
        self.partition_id = partition_id
        self.identity = dict(identity or {})
        self.keep_previous = keep_previous
        self._slots: dict[str, SavedModel] | None = None
        self._dirty = False

    @classmethod
    def from_context(
        cls,
        context: Context,
        folder: str | Path | None = None,
        identity: dict[str, str] | None = None,
        keep_previous: bool = False,
    ) -> NodeStore:
        """The node-local store of the client ``context`` belongs to.

        The partition id is the node config's ``partition-id``. The folder: ``folder``,
        else the node config's ``state-dir``, else this run's scratch folder
        ``<tmp>/fml-flower-state/run-<run id>`` (:func:`run_scratch_dir`). A durable folder
        (the first two) is continued: a file left there by an earlier run (with the same
        ``identity``) is restored on this node's first round of the run. The scratch folder
        is this run's alone; remove it when the run ends with :func:`remove_run_state` (in
        simulation, from the ServerApp: every client of the run lives on that machine).
        """
        if "partition-id" not in context.node_config:
            raise KeyError(
                "NodeStore.from_context: the node config has no 'partition-id' (set it with "
                "flower-supernode --node-config 'partition-id=<i> ...'; the simulation sets it)"
            )
        node_dir = context.node_config.get("state-dir")
        chosen = folder if folder not in (None, "") else node_dir
        durable = chosen not in (None, "")
        where = Path(str(chosen)).expanduser() if durable else run_scratch_dir(context.run_id)
        store = cls(
            context.state,
            where,
            int(context.node_config["partition-id"]),
            identity,
            keep_previous=keep_previous,
        )
        if durable:
            store.restore(None)
        return store

    @property
    def path(self) -> Path:
        """The file holding this client's slots."""
        return personal_file(self.folder, self.partition_id)

    def has_record(self) -> bool:
        """Whether this node has written its state in this run (``context.state`` says so)."""
        return RECORD in self.state

    def _all(self) -> dict[str, SavedModel]:
        if self._slots is None:
            self._slots = _recorded(self.state)
        return self._slots

    def has(self, slot: str = PERSONAL) -> bool:
        """Whether ``slot`` holds a model."""
        return slot in self._all()

    def load(self, slot: str) -> SavedModel | None:
        """The saved model of ``slot``, or None."""
        return self._all().get(slot)

    def save(self, slot: str, saved: SavedModel) -> None:
        """Keep ``saved`` in ``slot`` (on disk at the next :meth:`flush`)."""
        self._all()[slot] = saved
        self._dirty = True

    def flush(self, round_: int | None) -> Path | None:
        """Write the slots to :attr:`path` atomically if any changed (``round_``: the
        absolute round they were trained in) and record the file in ``context.state``.
        Returns the file, or None when there was nothing to write.
        """
        if not self._dirty:
            return None
        slots = self._all()
        personal = slots.get(PERSONAL)
        payload = {
            "identity": self.identity,
            "partition_id": self.partition_id,
            "round": round_,
            # the personalized model at the top level, as the format had it before
            **(_slot_entry(personal) if personal is not None else {}),
            "slots": {name: _slot_entry(saved) for name, saved in slots.items()},
        }
        path = self.path
        if path.exists() and self.keep_previous:
            os.replace(path, previous_file(self.folder, self.partition_id))  # keep one back
        digest = save_checkpoint(path, payload)
        self.state[RECORD] = ConfigRecord(
            {"file": str(path), "sha256": digest, "round": round_ or 0}
        )
        self._dirty = False
        return path

    def restore(self, arch: str | None, at_most_round: int | None = None) -> bool:
        """Continue from the file a previous run (or this node before a restart) left in
        the folder, when this run has not written one yet.

        ``arch``: the architecture of this client's personalized model (None: it keeps
        none). ``at_most_round`` (a resumed run: the last round the server's checkpoint
        holds) picks the newest saved version trained in that round or before.

        Returns False when there is nothing to restore (a client's first round ever). A
        corrupt file, or one saved for another partition, architecture or run identity,
        or no version old enough, raises :class:`CheckpointError` instead of letting the
        client start afresh or mix runs.
        """
        if self.has_record():
            return False
        path = self.path
        if not path.exists():
            prev = previous_file(self.folder, self.partition_id)
            if not prev.exists():
                return False
            path = prev  # a crash between keeping the old version and writing the new one
        payload = load_checkpoint(path)
        if at_most_round is not None and (payload.get("round") or 0) > at_most_round:
            prev = previous_file(self.folder, self.partition_id)
            older = load_checkpoint(prev) if prev.exists() and prev != path else None
            if older is None or (older.get("round") or 0) > at_most_round:
                also = "" if older is None else f" (and {prev.name} of round {older.get('round')})"
                raise CheckpointError(
                    f"{path}: holds the personalized model of round {payload.get('round')}"
                    f"{also}, but this run resumes after round {at_most_round}: no saved "
                    "version is old enough (resume from a later checkpoint, or use another "
                    "state-dir)"
                )
            path, payload = prev, older
        if payload.get("partition_id") != self.partition_id:
            raise CheckpointError(
                f"{path}: saved for partition {payload.get('partition_id')}, this node is "
                f"partition {self.partition_id}"
            )
        if arch is not None and payload.get("arch") != arch:
            raise CheckpointError(
                f"{path}: holds a '{payload.get('arch')}' personalized model, this client is "
                f"configured for '{arch}'; refusing to replace it"
            )
        saved = payload.get("identity", {})
        for key, value in self.identity.items():
            if saved.get(key) != value:
                raise CheckpointError(
                    f"{path}: saved by a run with {key} '{saved.get(key)}', this run has "
                    f"'{value}'; refusing to mix them (give this run another state-dir to "
                    "start fresh personalized models)"
                )
        entries = payload.get("slots") or {PERSONAL: payload}  # files of the older format
        self._slots = {name: _slot_of(entry) for name, entry in entries.items()}
        if PERSONAL in self._slots and arch is not None:
            self._slots[PERSONAL] = replace(self._slots[PERSONAL], arch=arch)
        self._dirty = True  # written to this run's record at the next flush
        return bool(self._slots)


def remove_run_state(run_id: int) -> bool:
    """Remove run ``run_id``'s scratch folder on this machine (the folder of every
    :class:`NodeStore` made by ``from_context`` without a durable folder); True if there was
    one. Call it when the run ends (the project's ServerApp does).
    """
    folder = run_scratch_dir(run_id)
    if not folder.exists():
        return False
    shutil.rmtree(folder)
    return True


def _recorded(state: RecordDict) -> dict[str, SavedModel]:
    """The slots in the file that ``state``'s record names (checksum verified), or none."""
    if RECORD not in state:
        return {}
    record = state[RECORD]
    payload = load_checkpoint(Path(str(record["file"])), expect_sha256=str(record["sha256"]))
    return {name: _slot_of(entry) for name, entry in payload.get("slots", {}).items()}


def node_slot(state: RecordDict, slot: str = PERSONAL) -> SavedModel | None:
    """What the :class:`NodeStore` of the node whose ``context.state`` is ``state`` holds in
    ``slot`` this run (read from the file its record names); None before it wrote one.
    """
    return _recorded(state).get(slot)
