"""FML through Flower's deployment runtime: a real SuperLink and SuperNodes on loopback.

Slow (each message runs in a fresh ``flwr-clientapp`` process): about 6 minutes on 2
busy cores. Run only these with ``pytest -m deployment``.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from fml_flower.checkpoint import load_checkpoint
from tools.launch import (
    deployment,
    env_for,
    free_port,
    node_config_arg,
    run_app,
    run_status,
    stop_tree,
)

ROOT = Path(__file__).resolve().parent.parent
MAKE_CERTS = ROOT / "scripts" / "make_certs.sh"


def node_configs(tmp_path: Path, n: int) -> list[dict[str, object]]:
    return [
        {"partition-id": i, "num-partitions": n, "state-dir": str(tmp_path / f"node{i}")}
        for i in range(n)
    ]


def run_config(out: Path, name: str, rounds: int, nodes: int) -> dict[str, object]:
    return {
        "federation.num_rounds": rounds,
        "federation.min_nodes": nodes,
        "federation.round_timeout": 300,
        "data.partitioner": "shard",  # every class reaches the few clients of these tests
        "model.meme": "mlp",
        "model.local": "mlp",
        "output.dir": str(out),
        "output.run_name": name,
    }


def finished_rounds(
    proc: subprocess.CompletedProcess[str], run_dir: Path, status: list[dict]
) -> list[dict]:
    """The rounds of a run that must have completed; fails with the log otherwise."""
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert status and status[-1]["status"] == "finished:completed", (status, log[-3000:])
    assert (run_dir / "metrics.json").is_file(), log[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())["rounds"]


def make_certs(out: Path) -> Path:
    subprocess.run(["bash", str(MAKE_CERTS), str(out)], check=True, capture_output=True, timeout=60)
    return out


def test_node_config_arg_is_what_flower_parses(tmp_path: Path) -> None:
    config = {
        "partition-id": 2,
        "num-partitions": 3,
        "state-dir": str(tmp_path / "a dir" / "node2"),
        "data-root": "C:\\data\\ü",
        "flag": True,
    }
    arg = node_config_arg(config)
    assert 'state-dir="' in arg and "partition-id=2 " in arg
    assert parse_config_args([arg]) == config
    with pytest.raises(ValueError):
        node_config_arg({"state-dir": 'say "hi"'})


@pytest.mark.deployment
@pytest.mark.slow
def test_insecure_deployment_runs_and_survives_a_supernode_restart(tmp_path: Path) -> None:
    out = tmp_path / "out"
    configs = node_configs(tmp_path, 3)
    with deployment(tmp_path / "flwr", tmp_path, 3, configs) as dep:
        config_toml = (dep.flwr_home / "config.toml").read_text()
        assert f'address = "{dep.address}"' in config_toml and "insecure = true" in config_toml
        assert len(dep.wait_for_nodes(3, timeout=120)) == 3

        proc = run_app(ROOT, dep.flwr_home, dep.connection, run_config(out, "dep1", 2, 3), None)
        rounds = finished_rounds(proc, out / "dep1", run_status(dep.flwr_home, dep.connection))
        assert [r["round"] for r in rounds] == [0, 1, 2]
        assert all(r["clients_trained"] == 3 for r in rounds[1:])
        assert rounds[-1]["replies_dropped"] == 0
        assert set(rounds[-1]["clients"]) == {"0", "1", "2"}
        assert "[round 2/2]" in proc.stdout
        for i in range(3):
            saved = load_checkpoint(tmp_path / f"node{i}" / f"personal-p{i}.ckpt")
            assert (saved["partition_id"], saved["rounds_trained"]) == (i, 2)

        # Restart SuperNode 1: it deregisters, comes back with a new node ID and the same
        # node config, and finds its personalized model on disk.
        before = set(dep.wait_for_nodes(3, timeout=60))
        assert dep.stop_node(1) == 0
        assert dep.nodes[1] is not None and dep.nodes[1].poll() is not None
        dep.start_node(1)
        after = set(dep.wait_for_nodes(3, timeout=120))
        assert len(after - before) == 1 and len(before - after) == 1

        proc = run_app(ROOT, dep.flwr_home, dep.connection, run_config(out, "dep2", 1, 3), None)
        rounds = finished_rounds(proc, out / "dep2", run_status(dep.flwr_home, dep.connection))
        assert [r["round"] for r in rounds] == [0, 1]
        assert rounds[1]["clients_trained"] == 3 and rounds[1]["replies_dropped"] == 0
        assert "personal_restored_from_disk': 1.0" in proc.stdout, proc.stdout[-3000:]
        # every client, the restarted node 1 included, restored its saved model for dep2
        for i in range(3):
            assert rounds[1]["clients_train"][str(i)]["personal_restored_from_disk"] == 1.0
        node1_log = dep.node_log(1).read_text()
    assert node1_log.count("=== start") == 2
    assert "Sending: train message" in node1_log.rsplit("=== start", 1)[1]  # the new process
    # 2 rounds in dep1 + 1 in dep2: the restarted node continued from the saved model.
    for i in range(3):
        saved = load_checkpoint(tmp_path / f"node{i}" / f"personal-p{i}.ckpt")
        assert (saved["partition_id"], saved["arch"], saved["rounds_trained"]) == (i, "mlp", 3)


@pytest.mark.deployment
def test_tls_deployment_runs_one_round(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    out = tmp_path / "out"
    with deployment(tmp_path / "flwr", tmp_path, 2, node_configs(tmp_path, 2), certs) as dep:
        config_toml = (dep.flwr_home / "config.toml").read_text()
        assert f'root-certificates = "{certs / "ca.crt"}"' in config_toml
        assert "insecure" not in config_toml
        # The SuperLink speaks HTTPS only, with the certificate made for 127.0.0.1.
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        with urllib.request.urlopen(f"https://{dep.address}/health", context=context) as r:
            assert r.status == 200
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://{dep.address}/health", timeout=5).close()
        for i in range(2):
            cmd = dep.supernode_command(i)
            assert "--insecure" not in cmd and str(certs / "ca.crt") in cmd

        proc = run_app(ROOT, dep.flwr_home, dep.connection, run_config(out, "tls", 1, 2), None)
        rounds = finished_rounds(proc, out / "tls", run_status(dep.flwr_home, dep.connection))
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["clients_trained"] == 2 and rounds[1]["replies_dropped"] == 0


@pytest.mark.deployment
def test_supernode_with_a_foreign_ca_fails_to_connect(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    foreign = make_certs(tmp_path / "foreign")
    log_path = tmp_path / "foreign-node.log"
    with deployment(tmp_path / "flwr", tmp_path, 0, [], certs) as dep, log_path.open("w") as log:
        cmd = [
            "flower-supernode",
            "--superlink",
            dep.address,
            "--root-certificates",
            str(foreign / "ca.crt"),
            "--port",
            str(free_port()),
            "--max-retries",
            "1",
            "--max-wait-time",
            "5",
        ]
        start = time.monotonic()
        node = subprocess.Popen(
            cmd,
            env=env_for(dep.flwr_home),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            returncode = node.wait(timeout=90)
        finally:
            stop_tree(node)
        seconds = time.monotonic() - start
        assert dep.node_ids() == []
    text = log_path.read_text()
    assert returncode != 0, text
    assert "CERTIFICATE_VERIFY_FAILED" in text or "certificate" in text.lower(), text
    assert seconds < 90


@pytest.mark.deployment
@pytest.mark.slow
def test_a_supernode_killed_mid_run_never_hangs_the_federation(tmp_path: Path) -> None:
    """SIGKILL one of 2 SuperNodes after round 1 and never restart it: the run ends on its
    own within a bound (Flower alone would wait for the second node forever), with the
    reason in the server's output and round 1's results kept.
    """
    import threading

    out = tmp_path / "out"
    with deployment(tmp_path / "flwr", tmp_path, 2, node_configs(tmp_path, 2)) as dep:
        assert len(dep.wait_for_nodes(2, timeout=120)) == 2
        config = {
            **run_config(out, "dead", 4, 2),
            "federation.round_timeout": 60,
            "federation.node_wait": 15,
        }
        result: dict[str, subprocess.CompletedProcess[str]] = {}
        started = time.monotonic()
        thread = threading.Thread(
            target=lambda: result.update(
                proc=run_app(ROOT, dep.flwr_home, dep.connection, config, None, timeout=600)
            )
        )
        thread.start()
        metrics = out / "dead" / "metrics.json"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait for round 1 to be recorded
            if metrics.is_file() and any(
                r["round"] == 1 for r in json.loads(metrics.read_text())["rounds"]
            ):
                break
            time.sleep(0.5)
        else:
            pytest.fail("round 1 never finished")
        killed_at = time.monotonic()
        assert dep.kill_node(1) == -9
        thread.join(timeout=400)
        assert not thread.is_alive(), "the run hung after a SuperNode died"
        ended = time.monotonic()
        log = result["proc"].stdout + result["proc"].stderr
        rounds = json.loads(metrics.read_text())["rounds"]
    assert rounds[1]["round"] == 1 and rounds[1]["clients_trained"] == 2
    # the end is bounded by the round timeout, Flower's node expiry and node_wait
    assert ended - killed_at < 300, (ended - started, log[-3000:])
    stopped = "waited 15 s for 2 connected nodes" in log
    finished = [r for r in rounds if r["round"] == 4]
    print(  # for docs/deployment.md's fault table (pytest -s)
        f"SuperNode killed after round 1: run ended {ended - killed_at:.0f} s after the kill, "
        f"{'stopped by node_wait' if stopped else 'finished'}; rounds "
        f"{[(r['round'], round(r['seconds']), r['clients_trained']) for r in rounds[1:]]}"
    )
    assert stopped or finished, log[-3000:]
    if finished:  # the dead node's replies are counted as missing or dropped, not waited for
        assert all(r["clients_trained"] == 1 for r in rounds[2:]), rounds


def _personal_models(folder: Path) -> dict[str, dict]:
    """``personal-p<i>.ckpt`` of every node folder under ``folder``: model tensors."""
    out = {}
    for path in sorted(folder.glob("node*/personal-p*.ckpt")):
        if ".prev." not in path.name:
            out[f"{path.parent.name}/{path.name}"] = load_checkpoint(path)
    return out


@pytest.mark.deployment
@pytest.mark.slow
def test_a_run_continues_bit_for_bit_after_its_superlink_is_killed(tmp_path: Path) -> None:
    """SIGKILL the SuperLink during round 2 of 3, restart it, continue with
    ``federation.resume_from``: the continued run ends with exactly the personalized
    models (every tensor, every bit) and scores of the same run left uninterrupted."""
    import threading

    import torch

    out = tmp_path / "out"
    flwr_home = tmp_path / "flwr"
    configs = node_configs(tmp_path / "ref", 2)
    with deployment(flwr_home, tmp_path, 2, configs) as dep:
        assert len(dep.wait_for_nodes(2, timeout=120)) == 2
        ref = run_app(ROOT, flwr_home, dep.connection, run_config(out, "ref", 3, 2), None, 900)
        ref_rounds = finished_rounds(ref, out / "ref", run_status(flwr_home, dep.connection))
        for i, config in enumerate(dep.node_configs):  # fresh state-dirs for the second run
            config["state-dir"] = str(tmp_path / "cut" / f"node{i}")
            dep.stop_node(i)
            dep.start_node(i)
        assert len(dep.wait_for_nodes(2, timeout=120)) == 2
        result: dict[str, subprocess.CompletedProcess[str]] = {}
        thread = threading.Thread(
            target=lambda: result.update(
                proc=run_app(
                    ROOT, flwr_home, dep.connection, run_config(out, "cut", 3, 2), None, 900
                )
            )
        )
        thread.start()
        metrics = out / "cut" / "metrics.json"
        states = [tmp_path / "cut" / f"node{i}" / f"personal-p{i}.ckpt" for i in range(2)]
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:  # kill once a client has finished round 2
            rounds = json.loads(metrics.read_text())["rounds"] if metrics.is_file() else []
            if any(r["round"] >= 2 for r in rounds):
                break  # too late to catch it inside round 2: kill now, resume after round 2
            done = [load_checkpoint(p).get("round") for p in states if p.is_file()]
            if any(r["round"] == 1 for r in rounds) and 2 in done:
                break
            time.sleep(0.2)
        else:
            pytest.fail("round 2 never started")
        killed_at = time.monotonic()
        assert dep.kill_superlink() == -9
        thread.join(timeout=300)
        assert not thread.is_alive()
        recorded = max(r["round"] for r in json.loads(metrics.read_text())["rounds"])
        assert recorded < 3, "the run finished before the SuperLink was killed"
        exited = [i for i, n in enumerate(dep.nodes) if n is not None and n.poll() is not None]
        for i in exited:  # a SuperNode that gave up is restarted as is
            dep.start_node(i)
        dep.start_superlink()
        assert len(dep.wait_for_nodes(2, timeout=180)) == 2
        back_at = time.monotonic()
        resume = {
            **run_config(out, "continued", 3, 2),
            "federation.resume_from": str(out / "cut"),
        }
        cont = run_app(ROOT, flwr_home, dep.connection, resume, None, 900)
        rounds = finished_rounds(cont, out / "continued", run_status(flwr_home, dep.connection))
        print(  # for docs/deployment.md's fault table (pytest -s)
            f"SuperLink killed after round {recorded} was recorded; SuperNodes that exited: "
            f"{exited}; nodes back {back_at - killed_at:.0f} s after the kill; continued "
            f"run {time.monotonic() - back_at:.0f} s"
        )
    log = cont.stdout + cont.stderr
    assert f"resuming after round {recorded}" in log, log[-3000:]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    first = next(r for r in rounds if r["round"] == recorded + 1)
    assert all(m["personal_restored_from_disk"] == 1.0 for m in first["clients_train"].values()), (
        first["clients_train"]
    )
    for key in ("personal_acc", "personal_loss", "global_acc", "central_acc", "central_loss"):
        assert rounds[-1][key] == ref_rounds[-1][key], (key, rounds[-1][key], ref_rounds[-1][key])
    ref_models = _personal_models(tmp_path / "ref")
    cut_models = _personal_models(tmp_path / "cut")
    assert len(ref_models) == 2 and set(ref_models) == set(cut_models)
    for name, saved in ref_models.items():
        other = cut_models[name]
        assert saved["round"] == other["round"] == 3
        assert set(saved["model"]) == set(other["model"])
        for k, tensor in saved["model"].items():
            assert torch.equal(tensor, other["model"][k]), (name, k)


@pytest.mark.deployment
@pytest.mark.slow
def test_a_supernode_restarted_mid_run_continues_its_personalized_model(tmp_path: Path) -> None:
    """SIGKILL SuperNode 1 after round 1 and start it again at once with the same node
    config: it comes back under a new node id, restores its personalized model from its
    state-dir, and trains every later round; at most the round it died in misses it."""
    import threading

    out = tmp_path / "out"
    with deployment(tmp_path / "flwr", tmp_path, 2, node_configs(tmp_path, 2)) as dep:
        assert len(dep.wait_for_nodes(2, timeout=120)) == 2
        config = {**run_config(out, "restart", 4, 2), "federation.round_timeout": 120}
        result: dict[str, subprocess.CompletedProcess[str]] = {}
        thread = threading.Thread(
            target=lambda: result.update(
                proc=run_app(ROOT, dep.flwr_home, dep.connection, config, None, timeout=900)
            )
        )
        thread.start()
        metrics = out / "restart" / "metrics.json"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if metrics.is_file() and any(
                r["round"] == 1 for r in json.loads(metrics.read_text())["rounds"]
            ):
                break
            time.sleep(0.3)
        else:
            pytest.fail("round 1 never finished")
        killed_at = time.monotonic()
        assert dep.kill_node(1) == -9
        dep.start_node(1)
        thread.join(timeout=600)
        assert not thread.is_alive(), "the run hung after a SuperNode restart"
        ended = time.monotonic()
        rounds = finished_rounds(
            result["proc"], out / "restart", run_status(dep.flwr_home, dep.connection)
        )
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4]
    missed = [r["round"] for r in rounds[2:] if r["clients_trained"] < 2]
    assert len(missed) <= 1 and missed in ([], [2]), [r["clients_trained"] for r in rounds]
    back = next(r for r in rounds[2:] if "1" in r["clients_train"])
    assert back["clients_train"]["1"]["personal_restored_from_disk"] == 1.0
    assert all(r["clients_trained"] == 2 for r in rounds[back["round"] :])
    saved = load_checkpoint(tmp_path / "node1" / "personal-p1.ckpt")
    assert saved["rounds_trained"] == 4 - len(missed)  # it continued its model: no restart
    assert set(rounds[-1]["clients"]) == {"0", "1"}
    print(  # for docs/deployment.md's fault table (pytest -s)
        f"SuperNode restarted after round 1: rounds without it {missed}; rounds "
        f"{[round(r['seconds']) for r in rounds[1:]]} s; run ended {ended - killed_at:.0f} s "
        "after the kill"
    )
