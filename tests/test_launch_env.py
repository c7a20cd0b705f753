"""The tooling finds Flower's commands beside its own interpreter, activated or not."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tools.launch import env_for, quiet_env


def test_flowers_commands_come_from_this_interpreters_bin_without_an_activated_venv(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # as `.venv/bin/python -m tools...` sees it
    bin_dir = str(Path(sys.executable).parent)
    assert quiet_env()["PATH"].split(os.pathsep) == [bin_dir, "/usr/bin", "/bin"]
    env = env_for(tmp_path)
    assert env["PATH"].split(os.pathsep)[0] == bin_dir and env["FLWR_HOME"] == str(tmp_path)
    monkeypatch.setenv("PATH", os.pathsep.join([bin_dir, "/bin"]))  # already there: unchanged
    assert quiet_env()["PATH"] == os.pathsep.join([bin_dir, "/bin"])
