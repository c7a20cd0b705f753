"""SuperNode authentication (Flower 1.42) in the deployment harness, on loopback.

The SuperLink runs with ``--enable-supernode-auth`` over TLS; each SuperNode's public key
is registered with ``flwr supernode register`` and the node starts with
``--auth-supernode-private-key``. Slow (real processes on busy cores): run with
``pytest -m deployment tests/test_supernode_auth.py``.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from flwr.cli.supernode.register import try_load_public_key

from tests.test_deployment import ROOT, finished_rounds, make_certs, node_configs, run_config
from tools.launch import (
    Deployment,
    deployment,
    env_for,
    free_port,
    make_node_keys,
    run_app,
    run_status,
    stop_tree,
)

REFUSED_KEY = "[code: 2004] Failed to activate SuperNode."
"""What a SuperNode with an unregistered key prints before it exits (exit code 1)."""
NO_KEY = "[code: 2001] SuperNode authentication is enabled."
"""What a SuperNode without a key prints before it exits (exit code 1)."""


def _pem_line(public_key: Path) -> str:
    """The first base64 line of ``public_key`` as PEM: how the SuperLink logs a key."""
    key = serialization.load_ssh_public_key(public_key.read_bytes())
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode().splitlines()[1]


def _wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    """The exit code of ``proc`` within ``timeout`` seconds; stops it (by PID) otherwise."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_tree(proc)
        pytest.fail(f"PID {proc.pid} still running after {timeout:.0f} s")
    finally:
        stop_tree(proc)  # and any SuperExec it left behind


def _run_until_exit(cmd: list[str], dep: Deployment, log_path: Path, timeout: float) -> int:
    """Start ``cmd`` (a SuperNode) in its own session, wait for it to exit; its output
    goes to ``log_path``.
    """
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=dep.cwd,
            env=env_for(dep.flwr_home),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return _wait_exit(proc, timeout)


def _rounds_so_far(metrics: Path) -> list[dict]:
    return json.loads(metrics.read_text())["rounds"] if metrics.is_file() else []


def test_make_node_keys_makes_keys_flower_loads(tmp_path: Path) -> None:
    keys = make_node_keys(tmp_path / "keys", 2)
    assert [k.name for k in keys] == ["node0.key", "node1.key"]
    for key in keys:
        # what flower-supernode does with --auth-supernode-private-key
        private = serialization.load_ssh_private_key(key.read_bytes(), None)
        assert private.curve.name == "secp384r1"
        assert key.stat().st_mode & 0o077 == 0
        # what `flwr supernode register` does with the public key file
        public = key.with_suffix(".pub")
        assert try_load_public_key(public) == private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    first = keys[0].read_bytes()
    assert make_node_keys(tmp_path / "keys", 3)[0].read_bytes() == first  # kept
    assert (tmp_path / "keys" / "node2.pub").is_file()


def test_auth_is_on_with_tls_and_needs_it(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    configs = node_configs(tmp_path, 1)
    with pytest.raises(ValueError, match="TLS"):
        Deployment(tmp_path, tmp_path, "127.0.0.1:1", configs, None, auth=True)
    with pytest.raises(ValueError, match="authentication"):
        with deployment(tmp_path / "flwr", tmp_path, 1, configs, None, unregistered={0}):
            pass
    plain = Deployment(tmp_path, tmp_path, "127.0.0.1:1", configs, None)
    assert "--auth-supernode-private-key" not in plain.supernode_command(0)
    secured = Deployment(tmp_path / "h", tmp_path, "127.0.0.1:1", configs, certs, auth=True)
    cmd = secured.supernode_command(0)
    key = cmd[cmd.index("--auth-supernode-private-key") + 1]
    assert key == str(tmp_path / "h" / "node-keys" / "node0.key")


@pytest.mark.deployment
def test_registered_nodes_train_and_an_unregistered_key_is_refused(tmp_path: Path) -> None:
    """(a) 2 registered SuperNodes train a round; (b) a third with a key that was never
    registered, and a fourth with no key, are refused at connection and never sampled.
    """
    certs = make_certs(tmp_path / "certs")
    out = tmp_path / "out"
    configs = node_configs(tmp_path, 2)
    # the intruder claims node 1's partition
    configs.append({"partition-id": 1, "num-partitions": 2, "state-dir": str(tmp_path / "x")})
    with deployment(tmp_path / "flwr", tmp_path, 3, configs, certs, unregistered={2}) as dep:
        assert dep.auth and "--enable-supernode-auth" in dep.superlink_args
        registered = dep.registered[:2]
        assert dep.registered[2] is None and all(isinstance(n, int) for n in registered)
        assert _wait_exit(dep.nodes[2], 120) == 1  # type: ignore[arg-type]
        no_key = [a for a in dep.supernode_command(2) if a != str(dep.node_key(2))]
        no_key.remove("--auth-supernode-private-key")
        no_key[no_key.index("--port") + 1] = str(free_port())
        assert _run_until_exit(no_key, dep, tmp_path / "no-key.log", 120) == 1
        assert set(dep.wait_for_nodes(2, timeout=120)) == set(registered)
        assert set(dep.node_statuses()) == set(registered)  # the intruder never got an id

        config = {**run_config(out, "auth", 1, 2), "data.max_train_examples": 200}
        proc = run_app(ROOT, dep.flwr_home, dep.connection, config, None)
        rounds = finished_rounds(proc, out / "auth", run_status(dep.flwr_home, dep.connection))
        node_logs = [dep.node_log(i).read_text() for i in range(3)]
        superlink_log = (dep.flwr_home / "superlink.log").read_text()
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["clients_trained"] == 2 and rounds[1]["replies_dropped"] == 0
    assert set(rounds[1]["clients"]) == {"0", "1"}
    for i in range(2):  # each registered node runs under the ID its registration returned
        assert f"SuperNode ID: {registered[i]}" in node_logs[i], node_logs[i][-2000:]
        assert "Sending: train message" in node_logs[i]
    intruder = node_logs[2]
    assert REFUSED_KEY in intruder and "Exit Code: 305" in intruder, intruder
    assert "SuperNode ID" not in intruder and "train message" not in intruder
    refused = [
        line
        for line in superlink_log.splitlines()
        if "[/v1/fleet/activate-node][ApiError:2004]" in line
    ]
    assert len(refused) == 1, superlink_log[-3000:]
    assert "No SuperNode found with the given public key." in refused[0]
    assert _pem_line(dep.node_public_key(2)) in refused[0]  # type: ignore[arg-type]
    no_key_log = (tmp_path / "no-key.log").read_text()
    assert NO_KEY in no_key_log, no_key_log
    assert "[/v1/fleet/register-node][ApiError:2001]" in superlink_log, superlink_log[-3000:]


class _RoundClock(threading.Thread):
    """Notes when each round first appears in a run's ``metrics.json`` (``time.monotonic``),
    polling every 0.2 s until ``stop`` is set.
    """

    def __init__(self, metrics: Path) -> None:
        super().__init__(daemon=True)
        self.metrics, self.stop = metrics, threading.Event()
        self.seen: dict[int, float] = {}

    def run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                rounds = _rounds_so_far(self.metrics)
            except (OSError, ValueError):  # being written
                continue
            for r in rounds:
                self.seen.setdefault(r["round"], time.monotonic())

    def wait_for(self, n: int, run: threading.Thread, timeout: float) -> float:
        """Wait until round ``n`` was seen; returns when it was."""
        deadline = time.monotonic() + timeout
        while n not in self.seen:
            if time.monotonic() > deadline or not run.is_alive():
                pytest.fail(f"round {n} never finished")
            time.sleep(0.2)
        return self.seen[n]


def _pushes(dep: Deployment, node_id: int | None) -> int:
    """How many replies node ``node_id`` pushed, from the SuperLink's log."""
    log = (dep.flwr_home / "superlink.log").read_text()
    return log.count(f"[Fleet.PushMessages] Push replies from node_id={node_id}\n")


def _kill_node1_after_node0_replied(
    dep: Deployment, clock: _RoundClock, run: threading.Thread, server_round: int
) -> float:
    """Wait until node 0 has pushed its reply of ``server_round`` while node 1 (slower: a
    CNN) has not, then SIGKILL node 1; returns when. The round's end then measures only
    how long the ServerApp waits for node 1's reply.
    """
    deadline = time.monotonic() + 400
    while _pushes(dep, dep.registered[0]) < server_round:
        if server_round in clock.seen or not run.is_alive() or time.monotonic() > deadline:
            pytest.fail(f"node 0 never replied in round {server_round}")
        time.sleep(0.1)
    node1_pushes = _pushes(dep, dep.registered[1])
    assert dep.kill_node(1) == -9
    killed = time.monotonic()
    if _pushes(dep, dep.registered[1]) != node1_pushes or server_round in clock.seen:
        pytest.fail(f"node 1 replied in round {server_round} before it was killed: rerun")
    return killed


@pytest.mark.deployment
@pytest.mark.slow
def test_a_restarted_node_keeps_its_node_id(tmp_path: Path) -> None:
    """Restarts of a registered SuperNode, measured (``pytest -s`` prints the numbers).

    A clean stop (SIGTERM) deactivates the node: it comes back at once, same node ID.
    Node 1 is then SIGKILLed in round 1 right after node 0 replied (node 1 trains a CNN,
    node 0 an MLP, so node 1 is the one still working), so the round's end measures only
    the wait for the dead node. Flower refuses the same key (``[code: 2004]``) until the
    dead connection's heartbeat expires, and only then answers its message with an error:
    the round waits that long; the harness restarts the node after it, same node ID. In
    round 2 node 1 is killed the same way and given a new identity
    (:meth:`Deployment.rekey_node`: unregister, new key): the round ends at once, and
    round 3 trains it under its new ID.
    """
    certs = make_certs(tmp_path / "certs")
    out = tmp_path / "out"
    configs = node_configs(tmp_path, 2)
    configs[1]["local-model"] = "cnn"  # node 1 is the slower one
    with deployment(tmp_path / "flwr", tmp_path, 2, configs, certs) as dep:
        first_id = dep.registered[1]
        assert set(dep.wait_for_nodes(2, timeout=120)) == set(dep.registered)

        # clean restart: the node deactivates on SIGTERM and is accepted again at once
        assert dep.stop_node(1) == 0
        assert dep.node_statuses()[first_id] == "offline"  # type: ignore[index]
        started = time.monotonic()
        dep.start_node(1)
        assert set(dep.wait_for_nodes(2, timeout=120)) == set(dep.registered)
        clean_back = time.monotonic() - started

        config = {**run_config(out, "restart", 3, 2), "federation.round_timeout": 240}
        result: dict[str, subprocess.CompletedProcess[str]] = {}
        thread = threading.Thread(
            target=lambda: result.update(
                proc=run_app(ROOT, dep.flwr_home, dep.connection, config, None, timeout=1200)
            )
        )
        thread.start()
        clock = _RoundClock(out / "restart" / "metrics.json")
        clock.start()

        # round 1: SIGKILL, restart with the same key
        killed = _kill_node1_after_node0_replied(dep, clock, thread, 1)
        early = _run_until_exit(dep.supernode_command(1), dep, tmp_path / "early.log", 120)
        early_log = (tmp_path / "early.log").read_text()
        assert early == 1 and REFUSED_KEY in early_log, early_log
        dep.start_node(1, timeout=120)  # waits until the old connection is offline
        same_start = time.monotonic() - killed
        assert set(dep.wait_for_nodes(2, timeout=120)) == set(dep.registered)
        same_online = time.monotonic() - killed
        same_round_end = clock.wait_for(1, thread, 400) - killed

        # round 2: SIGKILL, new identity
        killed = _kill_node1_after_node0_replied(dep, clock, thread, 2)
        second_id = dep.rekey_node(1)
        rekeyed = time.monotonic() - killed
        dep.start_node(1)
        new_round_end = clock.wait_for(2, thread, 400) - killed
        assert set(dep.wait_for_nodes(2, timeout=120)) == {dep.registered[0], second_id}
        new_online = time.monotonic() - killed
        statuses = dep.node_statuses()

        thread.join(timeout=600)
        clock.stop.set()
        assert not thread.is_alive(), "the run hung after a SuperNode restart"
        rounds = finished_rounds(
            result["proc"], out / "restart", run_status(dep.flwr_home, dep.connection)
        )
        node1_log = dep.node_log(1).read_text()
    assert second_id != first_id and statuses[first_id] == "unregistered"
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    # started 4 times: 3 times as the first ID (once refused: not in this log), then as
    # the second; the third process (same ID) received round 2's message
    starts = node1_log.split("=== start")[1:]
    assert [f"SuperNode ID: {first_id}" in s for s in starts] == [True, True, True, False]
    assert "Receiving: train message" in starts[2], starts[2][-2000:]
    assert f"SuperNode ID: {second_id}" in starts[3] and "Sending: train message" in starts[3]
    assert "SuperNode ID" not in early_log
    trained = [r["clients_trained"] for r in rounds[1:]]
    assert trained == [1, 1, 2], trained
    assert set(rounds[3]["clients"]) == {"0", "1"}
    # the same ID: the round waited for the heartbeat expiry (37.5-60 s after the kill);
    # a new identity: the round ended once the old ID was unregistered
    assert same_round_end > 30, same_round_end
    assert new_round_end < 30 and new_round_end < same_round_end, new_round_end
    print(  # for docs/deployment.md (pytest -s)
        f"clean restart: same node id, online {clean_back:.0f} s after the start. "
        f"Round 1, SIGKILL after node 0 replied, same key: refused at once ([code: 2004]); "
        f"round 1 ended {same_round_end:.1f} s after the kill; the harness started the node "
        f"{same_start:.0f} s after the kill, online {same_online:.0f} s after it (same id). "
        f"Round 2, SIGKILL after node 0 replied, rekey_node ({rekeyed:.1f} s): round 2 ended "
        f"{new_round_end:.1f} s after the kill; online {new_online:.0f} s after it (new id). "
        f"Round seconds {[round(r['seconds']) for r in rounds[1:]]}; dropped "
        f"{[r['dropped_reasons'] for r in rounds[1:]]}"
    )
