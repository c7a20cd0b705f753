"""Start a Flower SuperLink on loopback and run this app through ``flwr run``.

Used by the tests and scripts (not by the app itself): every process is started and
stopped by PID, in a private ``FLWR_HOME``, bounded in time. Plain ``subprocess``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

QUIET_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group of ``proc``, SIGKILL it if it does not exit in time."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


@contextmanager
def simulation_superlink(
    flwr_home: Path, cwd: Path, timeout: float = 60
) -> Iterator[tuple[str, int]]:
    """A simulation SuperLink on a free loopback port; yields (connection name, its PID).

    The connection is written to ``flwr_home/config.toml``; pass ``env_for(flwr_home)``
    to the ``flwr`` commands that use it.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )
    log = open(flwr_home / "superlink.log", "w")
    proc = subprocess.Popen(
        [
            "flower-superlink",
            "--insecure",
            "--simulation",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--database",
            str(flwr_home / "state.db"),
        ],
        cwd=cwd,
        env=env_for(flwr_home),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"flower-superlink did not start; see {log.name}")
            time.sleep(0.3)
        yield "sim", proc.pid
    finally:
        stop_process(proc)
        log.close()


def env_for(flwr_home: Path) -> dict[str, str]:
    """The environment for ``flwr`` commands: quiet, offline, private ``FLWR_HOME``."""
    return {**os.environ, **QUIET_ENV, "FLWR_HOME": str(flwr_home)}


def run_app(
    app_dir: Path,
    flwr_home: Path,
    connection: str,
    run_config: Mapping[str, object],
    num_supernodes: int,
    timeout: float = 900,
) -> subprocess.CompletedProcess[str]:
    """``flwr run <app_dir> <connection> --stream`` with the given run-config.

    Returns the finished process (stdout holds the streamed log). Note that ``flwr run``
    exits 0 even when the ServerApp fails: check the results, or :func:`run_status`.
    """
    pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
    return subprocess.run(
        [
            "flwr",
            "run",
            str(app_dir),
            connection,
            "--stream",
            "--run-config",
            pairs,
            "--federation-config",
            f"num-supernodes={num_supernodes} client-resources-num-cpus=1",
        ],
        env=env_for(flwr_home),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_status(flwr_home: Path, connection: str) -> list[dict]:
    """The runs the SuperLink knows, from ``flwr ls --format json``."""
    out = subprocess.run(
        ["flwr", "ls", connection, "--format", "json"],
        env=env_for(flwr_home),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout).get("runs", [])
