"""One message per round (``federation.evaluation: in-train``) scores the same models as a
separate evaluation message every round: the records agree to the bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.launch import run_app, run_status, simulation_superlink

ROOT = Path(__file__).resolve().parent.parent
SCORES = ("personal_acc", "personal_acc_min", "personal_acc_max", "personal_loss", "global_acc")


@pytest.mark.simulation
def test_in_train_evaluation_books_the_same_scores_as_separate_messages(tmp_path: Path) -> None:
    flwr_home, out = tmp_path / "flwr", tmp_path / "outputs"
    runs = {}
    with simulation_superlink(flwr_home, cwd=tmp_path) as (connection, _):
        for mode in ("separate", "in-train"):
            proc = run_app(
                ROOT,
                flwr_home,
                connection,
                {
                    "federation.num_rounds": 2,
                    "federation.evaluation": mode,
                    "data.partitioner": "shard",
                    "model.meme": "mlp",
                    "model.local": "mlp",
                    "output.dir": str(out),
                    "output.run_name": mode,
                },
                num_supernodes=3,
                timeout=600,
            )
            log = proc.stdout + proc.stderr
            assert proc.returncode == 0, log[-3000:]
            runs[mode] = (json.loads((out / mode / "metrics.json").read_text())["rounds"], log)
        status = run_status(flwr_home, connection)
    assert all(s["status"] == "finished:completed" for s in status), status
    separate, in_train = runs["separate"][0], runs["in-train"][0]
    assert [r["round"] for r in in_train] == [0, 1, 2]
    for a, b in zip(separate[1:], in_train[1:], strict=True):
        for key in SCORES:
            assert a[key] == b[key], (a["round"], key, a[key], b[key])
        assert a["central_acc"] == b["central_acc"]
        assert b["clients_evaluated"] == 3 and set(a["clients"]) == set(b["clients"])
        for client, scores in a["clients"].items():
            for key in ("personal_acc", "personal_loss", "global_acc", "global_loss"):
                assert scores[key] == b["clients"][client][key], (client, key)
    # round 1 was scored inside round 2's training messages
    assert "[round 1, scored by its clients before round 2]" in runs["in-train"][1]
    # evaluation messages: one per round, against one after the last round only
    assert runs["separate"][1].count("configure_evaluate: sampled 3 nodes") == 2
    assert runs["in-train"][1].count("configure_evaluate: sampled 3 nodes") == 1
