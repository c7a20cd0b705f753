"""The example app examples/tabular-fml: FML plugged into a user's project via the public API."""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client_app.state import MODEL_KEY
from fml_flower.launch import run_app, run_status, simulation_superlink

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "tabular-fml"
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))

from tabular_fml.client_app import evaluate_models, train  # noqa: E402
from tabular_fml.task import meme_model  # noqa: E402

RUN_CONFIG = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
    "config"
]


def _context() -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 1, "num-partitions": 3},
        state=RecordDict(),
        run_config=dict(RUN_CONFIG),
    )


def _message(kind: str, arrays: ArrayRecord) -> Message:
    config = ConfigRecord({"server-round": 1, "lr": 0.05, "alpha": 0.5, "beta": 0.5})
    return Message(
        RecordDict({"arrays": arrays, "config": config}), dst_node_id=7, message_type=kind
    )


def test_example_train_replies_with_the_meme_only_and_keeps_the_personal_model() -> None:
    torch.manual_seed(0)
    sent = ArrayRecord(meme_model().state_dict())
    context = _context()
    reply = train(_message(MessageType.TRAIN, sent), context)
    content = reply.content
    assert list(content.array_records) == ["arrays"]
    arrays = content["arrays"].to_torch_state_dict()
    assert set(arrays) == set(sent.to_torch_state_dict())  # exactly the meme's keys
    assert any(not torch.equal(arrays[k], v) for k, v in sent.to_torch_state_dict().items())
    metrics = list(content.metric_records.values())
    assert len(metrics) == 1 and metrics[0]["num-examples"] > 0
    personal = context.state[MODEL_KEY].to_torch_state_dict()
    assert len(personal) > len(arrays)  # the deeper private model stayed on the client

    evaluation = evaluate_models(_message(MessageType.EVALUATE, content["arrays"]), context)
    result = evaluation.content["metrics"]
    assert result["num-examples"] > 0
    assert 0.0 <= result["global_acc"] <= 1.0 and 0.0 <= result["personal_acc"] <= 1.0
    assert list(evaluation.content.array_records) == []


def test_example_readme_snippet_is_the_real_code() -> None:
    readme = (EXAMPLE / "README.md").read_text()
    section = readme.split("## Plug FML into your own project", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    for block, name in zip(blocks, ("server_app.py", "client_app.py"), strict=True):
        source = {
            line.strip() for line in (EXAMPLE / "tabular_fml" / name).read_text().splitlines()
        }
        snippet = [line.strip() for line in block.splitlines() if line.strip()]
        assert 10 <= len(snippet) <= 25
        missing = [line for line in snippet if line not in source]
        assert not missing, f"README lines not in {name}: {missing}"


@pytest.mark.simulation
def test_example_app_runs_two_rounds_in_simulation(tmp_path: Path) -> None:
    flwr_home, out = tmp_path / "flwr", tmp_path / "outputs"
    # cwd=tmp_path: the ClientApp imports from the SuperLink's working directory first.
    with simulation_superlink(flwr_home, cwd=tmp_path) as (connection, _):
        proc = run_app(
            EXAMPLE,
            flwr_home,
            connection,
            {"num-server-rounds": 2, "min-nodes": 3, "output-dir": str(out)},
            num_supernodes=3,
            timeout=600,
        )
        status = run_status(flwr_home, connection)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert status and status[-1]["status"] == "finished:completed", (status, log[-3000:])
    results = out / "results.json"
    assert results.is_file(), log[-3000:]
    rounds = json.loads(results.read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for row in rounds:
        assert row["clients_trained"] == 3 and row["clients_evaluated"] == 3
        for key in ("personal_acc", "global_acc"):
            assert isinstance(row[key], float) and 0.0 <= row[key] <= 1.0, (key, row)
    assert "FML finished" in log
