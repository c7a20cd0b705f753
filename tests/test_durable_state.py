"""Durable personalized state: written atomically each round, restored, never silently lost."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

import fml_flower.methods.fml as fml_method
from client_app.app import train
from client_app.state import node_slot, personal_file
from fml_flower.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fml_flower.config import SENT_CONFIG_KEY, load_config, to_yaml
from fml_flower.models import build_model
from fml_flower.personal import PERSONAL, cpu_state
from fml_flower.settings import RoundSettings

RUN_CONFIG = {
    "experiment": "base",
    "model.meme": "mlp",
    "model.local": "mlp",
    "train.momentum": 0.9,
}


def _context(state_dir: Path, pid: int = 2, run_config: dict | None = None) -> Context:
    return Context(
        run_id=1,
        node_id=11,
        state=RecordDict(),
        node_config={"partition-id": pid, "num-partitions": 10, "state-dir": str(state_dir)},
        run_config=run_config or RUN_CONFIG,
    )


def _train_message(server_round: int = 1, resume_from: str = "") -> Message:
    """A training message as FedMutualLearning sends it for ``RUN_CONFIG`` (momentum 0.9);
    with ``resume_from``, it carries the resumed run's configuration, as the ServerApp sends
    it (the clients cannot read the server's run folder).
    """
    arrays = ArrayRecord(build_model("mlp", (1, 28, 28), 10, seed=0).state_dict())
    settings = RoundSettings(
        lr=0.05,
        local_epochs=1,
        batch_size=32,
        momentum=0.9,
        round=server_round,
        alpha=0.5,
        beta=0.5,
    )
    config = ConfigRecord({"server-round": server_round, **settings.to_config()})
    if resume_from:
        overrides = {k: v for k, v in RUN_CONFIG.items() if k != "experiment"}
        cfg = load_config("base", {**overrides, "federation.resume_from": resume_from})
        config[SENT_CONFIG_KEY] = to_yaml(cfg).encode()
    return Message(
        RecordDict({"arrays": arrays, "config": config}),
        dst_node_id=11,
        message_type=MessageType.TRAIN,
    )


def _metrics(reply: Message) -> dict:
    return dict(next(iter(reply.content.metric_records.values())))


def _personal(context: Context) -> dict[str, torch.Tensor]:
    saved = node_slot(context.state, PERSONAL)
    assert saved is not None, "no personalized model in context.state"
    return saved.state


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_personal_model_is_written_each_round_and_restored_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    starts: list[dict[str, torch.Tensor]] = []  # the personalized model as training starts
    real_step = fml_method.mutual_step

    def spy(local: torch.nn.Module, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        starts.append(cpu_state(local))
        return real_step(local, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fml_method, "mutual_step", spy)
    first = _context(tmp_path)
    reply = train(_train_message(1), first)
    assert _metrics(reply)["personal_restored_from_disk"] == 0.0
    saved = load_checkpoint(personal_file(tmp_path, 2))
    assert saved["rounds_trained"] == 1 and saved["arch"] == "mlp"
    in_memory = _personal(first)
    assert _equal(saved["model"], in_memory)
    assert len(saved["optimizer"]) > 0  # the momentum buffers are saved with it
    # A restarted SuperNode: empty context.state, (a copy of) the same state dir
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path, copy, ignore=shutil.ignore_patterns("copy"))
    restarted = _context(copy)
    reply = train(_train_message(2), restarted)
    metrics = _metrics(reply)
    assert metrics["personal_restored_from_disk"] == 1.0
    assert len(starts) == 2 and _equal(starts[1], saved["model"])  # started from the file
    assert load_checkpoint(personal_file(copy, 2))["rounds_trained"] == 2
    assert not [p for p in copy.iterdir() if p.name.startswith(".")]  # no temp files left
    # The node that never restarted trains round 2 from the file its context.state names:
    # the restarted one (model and optimizer state from disk) must end exactly where it ends.
    train(_train_message(2), first)
    assert _equal(starts[2], in_memory)
    assert _equal(_personal(restarted), _personal(first))
    assert not _equal(_personal(restarted), in_memory)  # and round 2 did train it


def test_context_state_holds_only_what_identifies_the_state_file(tmp_path: Path) -> None:
    """The personalized model is off the message path: ``context.state`` (which Flower keeps
    in memory for every node and ships with every simulated message) names the file and
    its checksum, and holds no array."""
    node = _context(tmp_path)
    for r in (1, 2):
        train(_train_message(r), node)
    assert not node.state.array_records  # no model, no optimizer state
    (name,) = node.state.config_records
    record = node.state.config_records[name]
    assert record["file"] == str(personal_file(tmp_path, 2)) and record["round"] == 2
    assert sum(len(str(v)) for v in record.values()) < 300  # bytes, not megabytes
    assert node_slot(node.state, PERSONAL) is not None


def test_a_state_file_replaced_under_a_running_node_is_refused(tmp_path: Path) -> None:
    """Two nodes of one partition sharing a state-dir (a misconfiguration) must not train
    on each other's models: the second one to write makes the first one's record stale."""
    first, second = _context(tmp_path), _context(tmp_path)
    train(_train_message(1), first)
    train(_train_message(2), second)  # restores the first's file, then writes its own
    with pytest.raises(CheckpointError, match="is not the version this node wrote last"):
        train(_train_message(2), first)


def test_without_a_configured_folder_the_state_goes_to_the_runs_scratch_folder(
    tmp_path: Path,
) -> None:
    import tempfile

    from fml_flower.personal import run_scratch_dir

    node = Context(
        run_id=77,
        node_id=11,
        state=RecordDict(),
        node_config={"partition-id": 2, "num-partitions": 10},
        run_config=RUN_CONFIG,
    )
    train(_train_message(1), node)
    scratch = run_scratch_dir(77)
    assert scratch.parent.parent == Path(tempfile.gettempdir())
    assert personal_file(scratch, 2).exists() and not node.state.array_records
    elsewhere = tmp_path / "shared-state"  # federation.state_dir: every node of a simulation
    node = Context(
        run_id=78,
        node_id=11,
        state=RecordDict(),
        node_config={"partition-id": 2, "num-partitions": 10},
        run_config={**RUN_CONFIG, "federation.state_dir": str(elsewhere)},
    )
    train(_train_message(1), node)
    assert personal_file(elsewhere, 2).exists() and not run_scratch_dir(78).exists()


def test_corrupt_file_is_refused_not_replaced(tmp_path: Path) -> None:
    train(_train_message(1), _context(tmp_path))
    path = personal_file(tmp_path, 2)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        train(_train_message(2), _context(tmp_path))
    assert path.read_bytes() == bytes(raw)  # left as it was for the operator to inspect


@pytest.mark.parametrize("content", [b"", b"garbage\n", b'{"format": "other"}\n'])
def test_foreign_or_empty_file_is_refused(tmp_path: Path, content: bytes) -> None:
    personal_file(tmp_path, 2).write_bytes(content)
    with pytest.raises(CheckpointError, match="not an fml-flower checkpoint"):
        train(_train_message(1), _context(tmp_path))


def test_saved_model_of_another_architecture_is_refused(tmp_path: Path) -> None:
    train(_train_message(1), _context(tmp_path))
    other = {**RUN_CONFIG, "model.local": "lenet5"}
    with pytest.raises(CheckpointError, match="holds a 'mlp' personalized model"):
        train(_train_message(2), _context(tmp_path, run_config=other))


def test_file_of_another_partition_is_refused(tmp_path: Path) -> None:
    train(_train_message(1), _context(tmp_path, pid=2))
    os.replace(personal_file(tmp_path, 2), personal_file(tmp_path, 3))
    with pytest.raises(CheckpointError, match="saved for partition 2, this node is partition 3"):
        train(_train_message(1), _context(tmp_path, pid=3))


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.ckpt"
    save_checkpoint(path, {"v": torch.ones(1)})
    before = path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"v": torch.zeros(1)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]


def test_version_mismatch_is_named(tmp_path: Path) -> None:
    path = tmp_path / "x.ckpt"
    save_checkpoint(path, {"v": torch.ones(1)})
    header, _, data = path.read_bytes().partition(b"\n")
    path.write_bytes(header.replace(b'"version": 1', b'"version": 99') + b"\n" + data)
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(path)


def test_saved_model_of_another_method_is_refused(tmp_path: Path) -> None:
    train(_train_message(1), _context(tmp_path))
    other = {**RUN_CONFIG, "train.method": "local"}
    with pytest.raises(CheckpointError, match="saved by a run with method 'fml'"):
        train(_train_message(2), _context(tmp_path, run_config=other))


def test_a_resumed_run_restores_the_version_of_the_servers_last_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SuperLink died after this client had finished round 3, but the server's last
    checkpoint is round 2: the resumed run (round 3 again) must start from the client's
    round-2 model, kept as ``personal-p2.prev.ckpt``, not from its round-3 one."""
    from client_app.state import previous_file

    starts: list[dict[str, torch.Tensor]] = []
    real_step = fml_method.mutual_step

    def spy(local: torch.nn.Module, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        starts.append(cpu_state(local))
        return real_step(local, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fml_method, "mutual_step", spy)
    node = _context(tmp_path)
    for r in (1, 2):
        train(_train_message(r), node)
    after_two = _personal(node)
    train(_train_message(3), node)  # finished, but the server never recorded round 3
    assert load_checkpoint(personal_file(tmp_path, 2))["round"] == 3
    assert load_checkpoint(previous_file(tmp_path, 2))["round"] == 2
    resumed = _context(tmp_path)
    reply = train(_train_message(3, resume_from=str(tmp_path / "run")), resumed)
    assert _metrics(reply)["personal_restored_from_disk"] == 1.0
    assert _equal(starts[-1], after_two)  # round 3 again, from the round-2 model
    # a new (not resumed) run takes the newest version, as before
    fresh = _context(tmp_path)
    train(_train_message(1), fresh)
    assert load_checkpoint(previous_file(tmp_path, 2))["round"] == 3
    # resuming from further back than the files go is refused with the reason
    too_old = _context(tmp_path)
    with pytest.raises(CheckpointError, match=r"partition 2: .*no saved version is old enough"):
        train(
            _train_message(1, resume_from=str(tmp_path / "run")), too_old
        )  # files of rounds 1 and 3; resumes after round 0
