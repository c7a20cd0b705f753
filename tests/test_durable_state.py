"""Durable personalized state: written atomically each round, restored, never silently lost."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client_app.app import train
from client_app.state import MODEL_KEY, personal_file
from fml_flower.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fml_flower.models import build_model

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


def _train_message(server_round: int = 1) -> Message:
    arrays = ArrayRecord(build_model("mlp", (1, 28, 28), 10, seed=0).state_dict())
    config = ConfigRecord({"server-round": server_round, "lr": 0.05, "alpha": 0.5, "beta": 0.5})
    return Message(
        RecordDict({"arrays": arrays, "config": config}),
        dst_node_id=11,
        message_type=MessageType.TRAIN,
    )


def _metrics(reply: Message) -> dict:
    return dict(next(iter(reply.content.metric_records.values())))


def test_personal_model_is_written_each_round_and_restored_exactly(tmp_path: Path) -> None:
    first = _context(tmp_path)
    reply = train(_train_message(1), first)
    assert _metrics(reply)["personal_restored_from_disk"] == 0.0
    saved = load_checkpoint(personal_file(tmp_path, 2))
    assert saved["rounds_trained"] == 1 and saved["arch"] == "mlp"
    in_memory = first.state[MODEL_KEY].to_torch_state_dict()
    assert all(torch.equal(saved["model"][k], in_memory[k]) for k in in_memory)
    # A restarted SuperNode: empty context.state, same state dir
    restarted = _context(tmp_path)
    reply = train(_train_message(2), restarted)
    metrics = _metrics(reply)
    assert metrics["personal_restored_from_disk"] == 1.0
    expected = float(sum(v.abs().sum().item() for k, v in saved["model"].items()))
    assert metrics["personal_fingerprint_start"] == pytest.approx(expected, rel=1e-6)
    assert load_checkpoint(personal_file(tmp_path, 2))["rounds_trained"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


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
