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

from client_app.state import ContextStore
from fml_flower.personal import PERSONAL
from tests.conftest import new_run_id
from tools.launch import run_app, run_status, simulation_superlink

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "tabular-fml"
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))

from tabular_fml.client_app import client_data, evaluate, train  # noqa: E402
from tabular_fml.server_app import fml_strategy  # noqa: E402
from tabular_fml.task import meme_model  # noqa: E402

RUN_CONFIG = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
    "config"
]
DATA_KEYS = ("dirichlet-alpha", "seed")
"""The only run-config keys the ClientApp may read: everything else comes in the message."""


def _context() -> Context:
    return Context(
        run_id=new_run_id(),
        node_id=7,
        node_config={"partition-id": 1, "num-partitions": 3},
        state=RecordDict(),
        run_config={k: RUN_CONFIG[k] for k in DATA_KEYS},
    )


def _message(kind: str, arrays: ArrayRecord, server_round: int = 1) -> Message:
    """What the example's server sends: its strategy's config for ``server_round``."""
    config = ConfigRecord({"server-round": server_round})
    if kind == MessageType.TRAIN:
        config = fml_strategy(RUN_CONFIG).train_config(server_round, config)
    return Message(
        RecordDict({"arrays": arrays, "config": config}), dst_node_id=7, message_type=kind
    )


def test_example_server_sends_the_run_config_training_values() -> None:
    config = fml_strategy(RUN_CONFIG).train_config(3, ConfigRecord())
    for key in ("alpha", "beta", "lr", "momentum", "local-epochs", "batch-size"):
        assert config[key] == RUN_CONFIG[key], key
    assert config["round"] == 3
    strategy = fml_strategy({**RUN_CONFIG, "min-nodes": 3, "lr": 0.2})
    assert strategy.train_config(1, ConfigRecord())["lr"] == 0.2
    assert strategy.min_train_nodes == strategy.min_available_nodes == 3


def test_example_train_replies_with_the_meme_only_and_keeps_the_personal_model() -> None:
    torch.manual_seed(0)
    sent = ArrayRecord(meme_model().state_dict())
    context = _context()
    data = client_data(context)
    store = ContextStore(context.state)
    assert store.load(PERSONAL) is None

    reply = train(_message(MessageType.TRAIN, sent), context)
    content = reply.content
    assert list(content.array_records) == ["arrays"]
    arrays = content["arrays"].to_torch_state_dict()
    assert set(arrays) == set(sent.to_torch_state_dict())  # exactly the meme's keys
    assert any(not torch.equal(arrays[k], v) for k, v in sent.to_torch_state_dict().items())
    metrics = list(content.metric_records.values())
    assert len(metrics) == 1 and metrics[0]["num-examples"] == len(data.y_train)
    first = store.load(PERSONAL)
    assert first is not None and first.rounds_trained == 1
    assert len(first.state) > len(arrays)  # the deeper private model stayed on the client
    assert first.optimizer  # with its SGD momentum buffers

    # Round 2 continues the stored personalized model instead of starting a fresh one.
    train(_message(MessageType.TRAIN, content["arrays"], server_round=2), context)
    second = store.load(PERSONAL)
    assert second is not None and second.rounds_trained == 2
    assert any(not torch.equal(second.state[k], v) for k, v in first.state.items())

    evaluation = evaluate(_message(MessageType.EVALUATE, content["arrays"]), context)
    assert list(evaluation.content.array_records) == []
    result = evaluation.content["metrics"]
    assert result["num-examples"] == len(data.y_test)
    assert 0.0 <= result["global_acc"] <= 1.0 and 0.0 <= result["personal_acc"] <= 1.0


def test_example_evaluate_before_training_reports_only_the_global_model() -> None:
    context = _context()
    sent = ArrayRecord(meme_model().state_dict())
    result = evaluate(_message(MessageType.EVALUATE, sent), context).content["metrics"]
    assert 0.0 <= result["global_acc"] <= 1.0
    assert "personal_acc" not in result  # this client has no personalized model yet


def _in_order(snippet: list[str], source: list[str]) -> list[str]:
    """The snippet lines that are not found, in this order, among the source lines."""
    missing, at = [], 0
    for line in snippet:
        try:
            at = source.index(line, at) + 1
        except ValueError:
            missing.append(line)
    return missing


def test_example_readme_snippet_is_the_real_code() -> None:
    readme = (EXAMPLE / "README.md").read_text()
    section = readme.split("## Plug FML into your own project", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    for block, name in zip(blocks, ("server_app.py", "client_app.py"), strict=True):
        text = (EXAMPLE / "tabular_fml" / name).read_text()
        source = [line.strip() for line in text.splitlines()]
        snippet = [line.strip() for line in block.splitlines() if line.strip()]
        assert 10 <= len(snippet) <= 30
        missing = _in_order(snippet, source)
        assert not missing, f"README lines not in {name} (in this order): {missing}"


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
    saved = json.loads(results.read_text())
    assert saved["run"]["num-server-rounds"] == 2
    rounds = saved["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for row in rounds:
        assert row["clients_trained"] == 3 and row["clients_evaluated"] == 3
        for key in ("personal_acc", "global_acc"):
            assert isinstance(row[key], float) and 0.0 <= row[key] <= 1.0, (key, row)
    assert "FML finished" in log
