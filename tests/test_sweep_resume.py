"""A sweep cut in the middle of a run (its process tree SIGKILLed, as at a session's end)
continues that run from its last checkpointed round when started again, instead of
running it from the start. Everything started here is stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

SWEEP = {
    "supernodes": 3,
    "runs": [
        {
            "name": "fml",
            "experiment": "base",
            "overrides": {
                "train.method": "fml",
                "data.partitioner": "iid",
                "federation.num_rounds": 6,
                "model.meme": "mlp",
                "model.local": "mlp",
            },
        }
    ],
}


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
        except OSError:
            continue
        children.setdefault(int(fields["PPid"]), []).append(int(fields["Pid"]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _sweep(conf: Path, out: Path) -> subprocess.Popen:
    code = (
        "import sys; from pathlib import Path; from tools.experiments import run_sweep; "
        "run_sweep('cut', Path(sys.argv[2]), conf_dir=Path(sys.argv[1]))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, str(conf), str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _rounds(run_dir: Path) -> list[int]:
    try:
        return [r["round"] for r in json.loads((run_dir / "metrics.json").read_text())["rounds"]]
    except (OSError, ValueError):
        return []


@pytest.mark.slow
def test_a_sweep_killed_mid_run_continues_that_run_from_its_checkpoint(tmp_path: Path) -> None:
    conf, out = tmp_path / "conf", tmp_path / "out"
    (conf / "sweeps").mkdir(parents=True)
    (conf / "sweeps" / "cut.yaml").write_text(yaml.safe_dump(SWEEP))
    run_dir = out / "cut" / "fml"
    first = _sweep(conf, out)
    try:
        deadline = time.monotonic() + 300
        while max(_rounds(run_dir), default=0) < 2:
            assert first.poll() is None, first.stdout.read() if first.stdout else ""
            assert time.monotonic() < deadline, "round 2 never finished"
            time.sleep(0.2)
    finally:
        _kill_tree(first)
    cut_after = max(_rounds(run_dir))
    assert 2 <= cut_after < 6, cut_after
    assert (out / "cut" / ".state" / "fml" / "attempts.json").is_file()

    second = _sweep(conf, out)
    try:
        log, _ = second.communicate(timeout=600)
    finally:
        if second.poll() is None:
            _kill_tree(second)
    assert second.returncode == 0, log
    assert f"fml: continuing after round {cut_after}" in log, log
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == list(range(7))
    assert metrics["run"]["finished"]
    attempts = metrics["run"]["attempts"]
    assert [a["after_round"] for a in attempts] == [0, cut_after]
    assert all(a["commit"] for a in attempts)
    assert metrics["run"]["rounds_completed"] == 6  # every attempt's rounds
    # every round's personalized score, the round it continued after included
    assert all(r.get("personal_acc") is not None for r in metrics["rounds"][1:])
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["federation"]["resume_from"].endswith("fml")
    # the state and the continuation's folder are gone; nothing was moved aside
    assert not (out / "cut" / ".state" / "fml").exists()
    assert sorted(p.name for p in (out / "cut").iterdir() if not p.name.endswith(".log")) == [
        ".flwr",
        ".state",
        "accuracy.png",
        "fml",
        "results.md",
    ]
