"""A real FML run through Flower's simulation engine, end to end: clients with different
local architectures, one of them joining at round 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.launch import run_app, run_status, simulation_superlink

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.simulation
def test_two_rounds_in_simulation_write_the_results_folder(tmp_path: Path) -> None:
    flwr_home, out = tmp_path / "flwr", tmp_path / "outputs"
    with simulation_superlink(flwr_home, cwd=tmp_path) as (connection, _):
        proc = run_app(
            ROOT,
            flwr_home,
            connection,
            {
                "federation.num_rounds": 2,
                "data.partitioner": "shard",  # 4 clients x 2 shards: every class used
                "model.meme": "mlp",
                "model.local": "lenet5",
                "model.local_per_client": "{1: mlp, 2: cnn}",
                "federation.join_round": "{3: 2}",
                "output.dir": str(out),
                "output.run_name": "sim",
            },
            num_supernodes=4,
            timeout=600,
        )
        status = run_status(flwr_home, connection)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert status and status[-1]["status"] == "finished:completed", (status, log[-3000:])
    run_dir = out / "sim"
    for name in ("metrics.json", "metrics.csv", "config.yaml", "accuracy.png", "clients.png"):
        assert (run_dir / name).is_file(), f"{name} missing; log:\n{log[-3000:]}"
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    first = rounds[1]  # partition 3 joins in round 2
    assert first["clients_trained"] == 3 and set(first["clients"]) == {"0", "1", "2"}
    last = rounds[-1]
    assert last["clients_trained"] == 4 and last["replies_dropped"] == 0
    for key in (
        "personal_acc",
        "personal_acc_min",
        "personal_acc_max",
        "global_acc",
        "central_acc",
        "train_loss_local",
        "train_loss_meme",
        "seconds",
    ):
        assert isinstance(last[key], float), key
    assert last["personal_acc_min"] <= last["personal_acc"] <= last["personal_acc_max"]
    assert set(last["clients"]) == {"0", "1", "2", "3"}
    assert "lenet5" in (run_dir / "config.yaml").read_text()
    assert "[round 2/2]" in log
