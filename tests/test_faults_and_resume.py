"""Faults in a real Flower simulation (in-process), and resuming a run from its checkpoint.

Flower ClientApp *mods* inject the faults around the project's own train/evaluate
functions: node 1 raises in every training round, node 2 replies with NaN weights. The
run must finish, count both drops per round, and average only the healthy replies.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from client_app.app import evaluate, train
from client_app.errors import naming_partition
from fml_flower.checkpoint import load_checkpoint
from fml_flower.config import load_config
from server_app.app import run_fml
from strategies.robust import ClientsRefused


@pytest.fixture(autouse=True)
def private_tempdir() -> None:
    """Overrides conftest's: the ServerApp runs in this process, its clients in Ray
    workers, and both must see the same temporary directory (the run's scratch folder,
    which the ServerApp removes at the end).
    """


BASE = {
    "data.partitioner": "shard",  # 4 clients x 2 shards: every class used
    "model.meme": "mlp",
    "model.local": "mlp",
    "federation.min_nodes": 4,
    "train.lr_decay_every": 2,
    "output.plot": False,
}


def _fault_mod(msg: Message, context: Context, call_next: Callable) -> Message:
    # run_simulation passes an empty run-config, and Flower forbids changing it: hand the
    # app a context with this test's config that shares the node's state.
    context = Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=context.node_config,
        state=context.state,
        run_config={"experiment": "base", **BASE},
    )
    pid = int(context.node_config["partition-id"])
    is_train = msg.metadata.message_type == MessageType.TRAIN
    if is_train and pid == 1:
        # as an error inside the app's train handler is raised: naming its partition (a mod
        # of one's own runs outside the handlers, where the node id is all the server gets)
        with naming_partition(pid):
            raise RuntimeError("injected crash on partition 1")
    reply = call_next(msg, context)
    if is_train and pid == 2:
        arrays = reply.content["arrays"]
        poisoned = {
            k: Array(
                np.full(v.shape, np.nan, dtype=v.numpy().dtype)
                if np.issubdtype(v.numpy().dtype, np.floating)
                else v.numpy()
            )
            for k, v in arrays.items()
        }
        reply.content["arrays"] = ArrayRecord(poisoned)
    return reply


def _client_app() -> ClientApp:
    app = ClientApp(mods=[_fault_mod])
    app.train()(train)
    app.evaluate()(evaluate)
    return app


def _server_app(overrides: dict) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_fml(grid, load_config("base", {**BASE, **overrides}), context.run_id)

    return app


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    run_simulation(
        _server_app(
            {"federation.num_rounds": 2, "output.dir": str(out), "output.run_name": "faulty"}
        ),
        _client_app(),
        num_supernodes=4,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    return out / "faulty"


@pytest.mark.simulation
def test_crash_and_nan_nodes_are_dropped_and_counted(faulty_run: Path) -> None:
    metrics = json.loads((faulty_run / "metrics.json").read_text())
    assert metrics["run"]["finished"]
    rounds = [r for r in metrics["rounds"] if r["round"] > 0]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["clients_sampled"] == 4
        assert r["clients_trained"] == 2
        assert r["replies_dropped"] == 2
        reasons = " ".join(r["dropped_reasons"])
        assert "injected crash on partition 1" in reasons and "NaN" in reasons
        assert r["aggregated"] is True
        assert np.isfinite(r["central_acc"])  # the NaN reply never reached the average
        assert set(r["clients_train"]) == {"0", "3"}
        (label,) = r["clients_failed"]  # the client, by partition, and why, in one line
        assert label.startswith("partition 1 (node ")
        assert r["clients_failed"][label] == "RuntimeError: injected crash on partition 1"
    # the client that failed every round is named once, with its reason; it is not counted
    # in the evaluation of the rounds its training failed
    (failing,) = metrics["run"]["failing_clients"]
    assert failing["partition_id"] == 1 and failing["rounds"] == [1, 2]
    assert failing["reason"] == "RuntimeError: injected crash on partition 1"
    assert all(r["clients_evaluated"] == 3 and set(r["clients"]) == {"0", "2", "3"} for r in rounds)
    ckpt = load_checkpoint(faulty_run / "checkpoint.ckpt")
    assert ckpt["round"] == 2
    assert all(np.isfinite(v.numpy()).all() for v in ckpt["arrays"].values())


@pytest.mark.simulation
def test_resume_continues_from_the_checkpoint(faulty_run: Path, tmp_path: Path) -> None:
    run_simulation(
        _server_app(
            {
                "federation.num_rounds": 3,
                "output.dir": str(tmp_path),
                "output.run_name": "resumed",
                "federation.resume_from": str(faulty_run),
            }
        ),
        _client_app(),
        num_supernodes=4,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    before = json.loads((faulty_run / "metrics.json").read_text())["rounds"]
    after = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert after["run"]["resumed_from"] == str(faulty_run)  # as configured (not resolved)
    assert [r["round"] for r in after["rounds"]] == [0, 1, 2, 3]
    assert after["rounds"][:3] == before
    assert after["rounds"][3]["lr"] == pytest.approx(0.001)  # the decay schedule went on
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.ckpt")["round"] == 3


def test_resume_errors_are_named(tmp_path: Path) -> None:
    from fml_flower.config import ConfigError
    from server_app.app import resume_point

    with pytest.raises(ConfigError, match=r"no checkpoint\.ckpt in"):
        resume_point(load_config("base", {"federation.resume_from": str(tmp_path)}))


def _plain_server(cfg_of: Callable[[], object]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_fml(grid, cfg_of(), context.run_id)  # type: ignore[arg-type]

    return app


def _round_three_fails(msg: Message, context: Context, call_next: Callable) -> Message:
    if msg.metadata.message_type == MessageType.TRAIN and msg.content["config"]["round"] == 3:
        raise RuntimeError("injected: this node is lost in round 3")
    return call_next(msg, context)


@pytest.mark.simulation
@pytest.mark.slow
def test_a_run_resumed_with_resume_from_alone_ends_as_the_uninterrupted_run(
    tmp_path: Path,
) -> None:
    """``federation.resume_from=<folder>`` and nothing else: the server takes the recorded
    configuration (non-default keys included), the clients get it in every message (the
    simulation gives them an empty run-config), and the continued run's last round equals
    the uninterrupted run's.
    """
    from client_app.app import app as client
    from fml_flower.config import config_from_run_config

    settings = {**BASE, "federation.num_rounds": 3, "output.dir": str(tmp_path)}
    full = {**settings, "federation.state_dir": str(tmp_path / "s1"), "output.run_name": "full"}
    cut = {**settings, "federation.state_dir": str(tmp_path / "s2"), "output.run_name": "cut"}
    backend = {"client_resources": {"num_cpus": 1}}
    run_simulation(
        _plain_server(lambda: load_config("base", full)), client, 4, backend_config=backend
    )
    failing = ClientApp(mods=[_round_three_fails])
    failing.train()(train)
    failing.evaluate()(evaluate)
    with pytest.raises(ClientsRefused, match=r"RuntimeError: injected: this node is lost"):
        run_simulation(
            _plain_server(lambda: load_config("base", cut)), failing, 4, backend_config=backend
        )
    stopped = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert stopped["run"]["finished"] is False
    assert "ClientsRefused" in stopped["run"]["failed"]
    assert max(r["round"] for r in stopped["rounds"]) == 2
    resume_only = {"federation.resume_from": str(tmp_path / "cut")}
    resumed_cfg = config_from_run_config(resume_only)
    assert resumed_cfg.train.lr_decay_every == 2 and resumed_cfg.model.local == "mlp"
    run_simulation(_plain_server(lambda: resumed_cfg), client, 4, backend_config=backend)
    (folder,) = [p for p in tmp_path.iterdir() if p.name.endswith("-base")]
    resumed = json.loads((folder / "metrics.json").read_text())
    expected = json.loads((tmp_path / "full" / "metrics.json").read_text())["rounds"][3]
    last = resumed["rounds"][3]
    assert resumed["run"]["finished"] and last["round"] == 3
    for key in ("personal_acc", "global_acc", "central_acc", "train_loss_local", "lr"):
        assert last[key] == expected[key], key
    # every round scored by the clients, the one the run continued after included (its
    # clients score it before the resumed run's first training)
    full_rounds = json.loads((tmp_path / "full" / "metrics.json").read_text())["rounds"]
    got = [r.get("personal_acc") for r in resumed["rounds"][1:]]
    assert got == [r["personal_acc"] for r in full_rounds[1:]]


def test_a_resume_that_would_change_the_experiment_is_refused_by_name(tmp_path: Path) -> None:
    from fml_flower.config import ConfigError, config_from_run_config, to_yaml

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(load_config("base", BASE)))
    cfg = config_from_run_config({"federation.resume_from": str(run), "federation.num_rounds": 20})
    assert cfg.federation.num_rounds == 20 and cfg.model.meme == "mlp"
    assert cfg.output.run_name == ""  # the continued run gets a folder of its own
    with pytest.raises(ConfigError, match=r"train.method='fedavg' \(the run has 'fml'\)"):
        config_from_run_config({"federation.resume_from": str(run), "train.method": "fedavg"})
    with pytest.raises(ConfigError, match=r"model.local='cnn' \(the run has 'mlp'\)"):
        config_from_run_config(
            {"federation.resume_from": str(run), "overrides": "{model.local: cnn}"}
        )
    with pytest.raises(ConfigError, match=r"no config\.yaml in"):
        config_from_run_config({"federation.resume_from": str(tmp_path)})
