"""Shared fixtures: Flower's task identity, small configurations, the shared data path."""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("FML_SHARED_DATA", ROOT.parent / "shared" / "data"))

for _key, _value in {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Messages built in unit tests need a task identity, as inside a Flower process."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Each test its own system temporary directory: a client without a configured state
    folder keeps its state in a run's scratch folder there, and tests reuse run ids.
    """
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp("systemp")))


def shared_dataset(name: str) -> Path:
    """The folder of a dataset in ../shared/data, or skip the test if it is absent."""
    folder = SHARED_DATA / name
    if not (folder / "train.npz").exists():
        pytest.skip(
            f"needs the real dataset at {folder} (../shared/data is absent on a fresh "
            "clone; set FML_SHARED_DATA to its location)"
        )
    return folder


_RUN_IDS = itertools.count(1000)


def new_run_id() -> int:
    """A run id no other context of this test session has: each run has its own scratch
    state folder, as every Flower run has its own id.
    """
    return next(_RUN_IDS)
