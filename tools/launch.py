"""Start a Flower SuperLink on loopback and run this app through ``flwr run``.

:func:`simulation_superlink` starts a simulation SuperLink; :func:`deployment` a
deployment-runtime SuperLink with real SuperNodes (see ``docs/deployment.md``).

Used by the tests and scripts (not by the app itself): every process is started and
stopped by PID, in a private ``FLWR_HOME``, bounded in time. Plain ``subprocess``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import time
import tomllib
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import yaml

QUIET_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


SUPEREXEC_POLL_INTERVAL = 0.1
"""Seconds between a SuperNode's SuperExec checks for work (Flower's default: 1 s)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


def _healthy_at(address: str, ca: Path | None) -> bool:
    scheme, context = "http", None
    if ca is not None:
        scheme, context = "https", ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(
            f"{scheme}://{address}/health", timeout=2, context=context
        ) as resp:
            return resp.status == 200
    except OSError:
        return False


def _write_connection(flwr_home: Path, name: str, address: str, ca: Path | None) -> None:
    """Make ``name`` the default SuperLink connection in ``flwr_home/config.toml``."""
    security = f"root-certificates = {json.dumps(str(ca))}" if ca else "insecure = true"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n'
        f"{security}\n"
    )


def _start_superlink(
    flwr_home: Path,
    cwd: Path,
    port: int,
    mode_args: list[str],
    ca: Path | None,
    timeout: float,
    extra_env: Mapping[str, str] | None = None,
) -> tuple[subprocess.Popen, Path]:
    """Start ``flower-superlink`` on ``127.0.0.1:port`` and wait until it is healthy.

    ``mode_args`` are ``--insecure``/TLS flags and ``--simulation``. Returns the process
    (in its own session) and its log file.
    """
    log_path = flwr_home / "superlink.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                "flower-superlink",
                *mode_args,
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--database",
                str(flwr_home / "state.db"),
            ],
            cwd=cwd,
            env={**env_for(flwr_home), **(extra_env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while not _healthy_at(f"127.0.0.1:{port}", ca):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise RuntimeError(f"flower-superlink did not start; see {log_path}")
        time.sleep(0.3)
    return proc, log_path


@contextmanager
def simulation_superlink(
    flwr_home: Path, cwd: Path, timeout: float = 60, ray_address: str | None = None
) -> Iterator[tuple[str, int]]:
    """A simulation SuperLink on a free loopback port; yields (connection name, its PID).

    The connection is written to ``flwr_home/config.toml``; pass ``env_for(flwr_home)``
    to the ``flwr`` commands that use it. ``ray_address``: run the simulation on that
    running Ray cluster (``RAY_ADDRESS`` in the SuperLink's environment, see
    :func:`ray_head`) instead of a Ray instance of its own.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    _write_connection(flwr_home, "sim", f"127.0.0.1:{port}", None)
    env = {"RAY_ADDRESS": ray_address} if ray_address else None
    proc, _ = _start_superlink(
        flwr_home, cwd, port, ["--insecure", "--simulation"], None, timeout, env
    )
    try:
        yield "sim", proc.pid
    finally:
        stop_tree(proc)


@contextmanager
def ray_head(temp_dir: Path, num_cpus: int = 2, timeout: float = 120) -> Iterator[str]:
    """A Ray head node on 127.0.0.1 (``ray start --head --block``, in its own session);
    yields its address (what ``RAY_ADDRESS`` takes). On exit the ``ray start`` process
    and every process of its session (raylet, GCS, workers) are stopped by PID.

    ``temp_dir`` must be short (Ray puts Unix sockets in it, 107 characters at most) and
    keeps this cluster's address file away from ``/tmp/ray``, where an unrelated
    ``ray.init()`` on the machine would find and join it.
    """
    port = free_port()
    temp_dir.mkdir(parents=True, exist_ok=True)
    log_path = temp_dir / "ray-start.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                "ray",
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={port}",
                f"--num-cpus={num_cpus}",
                "--num-gpus=0",
                f"--temp-dir={temp_dir}",
                "--include-dashboard=false",
                "--disable-usage-stats",
            ],
            env={**os.environ, **QUIET_ENV},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in log_path.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start did not start a head node; see {log_path}")
            time.sleep(0.5)
        yield address
    finally:
        session = _session_of(proc.pid)
        stop_process(proc)
        _stop_session(session, timeout=20)


def _session_of(pid: int) -> set[tuple[int, int]]:
    """``(PID, start time)`` of the live processes in the session that ``pid`` leads, and
    of their descendants (Ray may give its daemons sessions of their own).
    """
    table = _processes()
    found = {(p, started) for p, (_, sid, started, _) in table.items() if sid == pid}
    todo = [p for p, _ in found] + [pid]
    while todo:
        head = todo.pop()
        for p, (ppid, _, started, _) in table.items():
            if ppid == head and (p, started) not in found:
                found.add((p, started))
                todo.append(p)
    return found


def _stop_session(family: set[tuple[int, int]], timeout: float) -> None:
    """SIGTERM, then SIGKILL, the processes of ``family`` still alive (by PID)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, _ in _still_alive(family):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while _still_alive(family) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _still_alive(family):
            return


def env_for(flwr_home: Path) -> dict[str, str]:
    """The environment for ``flwr`` commands: quiet, offline, private ``FLWR_HOME``."""
    return {**os.environ, **QUIET_ENV, "FLWR_HOME": str(flwr_home)}


def run_app(
    app_dir: Path,
    flwr_home: Path,
    connection: str,
    run_config: Mapping[str, object],
    num_supernodes: int | None,
    timeout: float = 900,
    num_cpus: int = 1,
    as_overrides: bool | None = None,
) -> subprocess.CompletedProcess[str]:
    """``flwr run <app_dir> <connection> --stream`` with the given run-config.

    With ``as_overrides`` (by default: when the app's run-config declares ``overrides``, as
    fml-flower's does) every key but ``experiment`` travels in ``overrides``, which always
    applies; otherwise (another app, an older checkout) as plain ``key=value`` pairs.

    ``num_supernodes`` (simulation) is passed as ``--federation-config``; give ``None``
    for a deployment connection, whose SuperLink ignores a federation config (the
    SuperNodes that are connected take part). ``num_cpus`` is each simulated client's
    CPU share (``client-resources-num-cpus``): the number of clients trained at once is
    the machine's cores divided by it.

    Returns the finished process (stdout holds the streamed log). Note that ``flwr run``
    exits 0 even when the ServerApp fails: check the results, or :func:`run_status`.
    """
    # Everything but the experiment goes into `overrides`, which always applies: a plain
    # key whose value equals base.yaml's cannot override an experiment file.
    if as_overrides is None:
        with open(Path(app_dir) / "pyproject.toml", "rb") as fh:
            declared = tomllib.load(fh).get("tool", {}).get("flwr", {}).get("app", {})
        as_overrides = "overrides" in declared.get("config", {})
    if as_overrides:
        settings = {k: v for k, v in run_config.items() if k != "experiment"}
        pairs = f"overrides={json.dumps(run_config_value(settings))}"
        if "experiment" in run_config:
            pairs = f"experiment={json.dumps(str(run_config['experiment']))} {pairs}"
    else:
        pairs = " ".join(f"{k}={json.dumps(run_config_value(v))}" for k, v in run_config.items())
    federation = (
        []
        if num_supernodes is None
        else [
            "--federation-config",
            f"num-supernodes={num_supernodes} client-resources-num-cpus={num_cpus}",
        ]
    )
    return subprocess.run(
        ["flwr", "run", str(app_dir), connection, "--stream", "--run-config", pairs, *federation],
        env=env_for(flwr_home),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_config_value(value: object) -> bool | int | float | str:
    """A value Flower's run-config accepts (bool, int, float or str): lists and mappings
    become YAML flow strings, which the configuration loader parses back
    (``[0.1, 0.5, 0.9]``, ``{0: resnet18}``, a list of regexes in single quotes).
    """
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple | dict):
        return yaml.safe_dump(
            list(value) if isinstance(value, tuple) else value,
            default_flow_style=True,
            width=1 << 20,
        ).strip()
    raise TypeError(f"run-config value {value!r} must be a bool, number, string, list or dict")


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


# --------------------------------------------------------------------- deployment runtime


def _processes() -> dict[int, tuple[int, int, int, list[str]]]:
    """Live processes: PID -> (parent PID, session ID, start time, argv) (Linux ``/proc``)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            argv = (stat.parent / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if fields[0] != "Z":
            table[int(stat.parent.name)] = (int(fields[1]), int(fields[3]), int(fields[19]), argv)
    return table


def _flower_family(pid: int) -> set[tuple[int, int]]:
    """The Flower processes that ``pid`` started, directly or not, alive now.

    A process belongs if its parent, its session or its ``--parent-pid`` argument is
    ``pid`` or another member (orphans keep the last two), and it is a Flower program.
    Returns ``(PID, start time)`` pairs, so that a reused PID is never taken for one.
    """
    table = _processes()
    found: set[tuple[int, int]] = set()
    todo = [pid]
    while todo:
        head = todo.pop()
        for other, (ppid, sid, started, argv) in table.items():
            if (other, started) in found or other == pid:
                continue
            flower = any(Path(a).name.startswith(("flwr", "flower")) for a in argv[:2])
            by_arg = any(a == "--parent-pid" and b == str(head) for a, b in pairwise(argv))
            if flower and (ppid == head or sid == head or by_arg):
                found.add((other, started))
                todo.append(other)
    return found


def _still_alive(family: set[tuple[int, int]]) -> set[tuple[int, int]]:
    table = _processes()
    return {(pid, started) for pid, started in family if table.get(pid, (0, 0, -1))[2] == started}


def stop_tree(proc: subprocess.Popen, timeout: float = 20) -> None:
    """:func:`stop_process`, then also the Flower processes it left behind, by PID.

    Flower's SuperLink starts ``flower-superexec`` in a session of its own, and a
    SuperNode that exits on its own leaves its ``flower-superexec`` behind; they exit
    when they notice their parent is gone, but not at once. Whatever is still alive after
    ``timeout`` gets SIGTERM, then SIGKILL.
    """
    family = _flower_family(proc.pid)
    stop_process(proc, timeout)
    family |= _flower_family(proc.pid)
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        for pid, _ in (family := _still_alive(family)) if sig is not None else ():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while (family := _still_alive(family)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not family:
            return


def node_config_arg(config: Mapping[str, object]) -> str:
    """A ``--node-config`` value: ``key=value`` pairs, strings double-quoted (TOML).

    ``{"partition-id": 0, "state-dir": "/x"}`` gives ``partition-id=0 state-dir="/x"``.
    Flower parses each value as TOML, so an unquoted path would be rejected and an
    unquoted ``true`` would become a bool.
    """
    parts = []
    for key, value in config.items():
        if isinstance(value, Path):
            value = str(value)
        if (isinstance(value, str) and '"' in value) or not key or set(key) & set(' ="'):
            raise ValueError(f"node config {key}={value!r} cannot be passed on a command line")
        parts.append(f"{key}={json.dumps(value)}")
    return " ".join(parts)


class Deployment:
    """A running SuperLink (deployment runtime) and its SuperNodes; see :func:`deployment`.

    ``connection`` names the SuperLink connection in ``flwr_home/config.toml``;
    ``address`` is the SuperLink's one ``host:port`` (Fleet, Control and Runtime APIs).
    """

    def __init__(
        self,
        flwr_home: Path,
        cwd: Path,
        address: str,
        node_configs: list[dict[str, object]],
        tls_dir: Path | None,
        connection: str = "deployment",
        superexec_poll_interval: float | None = SUPEREXEC_POLL_INTERVAL,
    ) -> None:
        self.flwr_home, self.cwd, self.address = flwr_home, cwd, address
        self.superexec_poll_interval = superexec_poll_interval
        self.node_configs, self.tls_dir, self.connection = node_configs, tls_dir, connection
        self.nodes: list[subprocess.Popen | None] = [None] * len(node_configs)
        self.node_ports: list[int] = [free_port() for _ in node_configs]
        self.superlink: subprocess.Popen | None = None
        self.superlink_args: list[str] = []

    @property
    def ca(self) -> Path | None:
        """The CA certificate the clients trust (None: insecure)."""
        return self.tls_dir / "ca.crt" if self.tls_dir is not None else None

    def node_log(self, i: int) -> Path:
        """SuperNode ``i``'s log file (stdout and stderr, appended across restarts)."""
        return self.flwr_home / f"supernode-{i}.log"

    def supernode_command(self, i: int) -> list[str]:
        """The ``flower-supernode`` command line of node ``i``."""
        cmd = ["flower-supernode", "--superlink", self.address]
        cmd += ["--root-certificates", str(self.ca)] if self.ca is not None else ["--insecure"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.node_ports[i])]
        if self.node_configs[i]:
            cmd += ["--node-config", node_config_arg(self.node_configs[i])]
        return cmd

    def start_node(self, i: int) -> subprocess.Popen:
        """Start SuperNode ``i`` (again) with its node config; it connects on its own."""
        if (old := self.nodes[i]) is not None and old.poll() is None:
            raise RuntimeError(f"SuperNode {i} is already running (PID {old.pid})")
        with open(self.node_log(i), "a") as log:
            log.write(f"\n=== start {time.strftime('%H:%M:%S')}: {self.supernode_command(i)}\n")
            log.flush()
            env = env_for(self.flwr_home)
            if self.superexec_poll_interval is not None:
                env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(self.superexec_poll_interval)
            proc = subprocess.Popen(
                self.supernode_command(i),
                cwd=self.cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.nodes[i] = proc
        return proc

    def stop_node(self, i: int, timeout: float = 20) -> int | None:
        """Stop SuperNode ``i`` (SIGTERM: it deregisters); returns its exit code."""
        proc = self.nodes[i]
        if proc is None:
            return None
        stop_tree(proc, timeout)
        return proc.returncode

    def kill_node(self, i: int, timeout: float = 20) -> int | None:
        """SIGKILL SuperNode ``i`` and the Flower processes it started (a node that dies:
        it cannot deregister), reaping it; returns its exit code.
        """
        proc = self.nodes[i]
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        family = _flower_family(proc.pid)
        proc.kill()
        proc.wait(timeout=timeout)  # reaped: no zombie keeping its children
        for pid, _ in _still_alive(family):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while _still_alive(family) and time.monotonic() < deadline:
            time.sleep(0.2)
        return proc.returncode

    def start_superlink(self, timeout: float = 90) -> subprocess.Popen:
        """Start the SuperLink (again) on its address, with its database
        (``flwr_home/state.db``), and wait until it is healthy.
        """
        if self.superlink is not None and self.superlink.poll() is None:
            raise RuntimeError(f"the SuperLink is already running (PID {self.superlink.pid})")
        port = int(self.address.rsplit(":", 1)[1])
        self.superlink, _ = _start_superlink(
            self.flwr_home, self.cwd, port, self.superlink_args, self.ca, timeout
        )
        return self.superlink

    def kill_superlink(self, timeout: float = 20) -> int | None:
        """SIGKILL the SuperLink and the Flower processes it started (its ServerApp, its
        SuperExec), reaping them: a SuperLink that dies mid-run. Returns its exit code.
        """
        proc = self.superlink
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        family = _flower_family(proc.pid)
        proc.kill()
        proc.wait(timeout=timeout)
        for pid, _ in _still_alive(family):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while _still_alive(family) and time.monotonic() < deadline:
            time.sleep(0.2)
        return proc.returncode

    def node_ids(self) -> list[int]:
        """IDs of the SuperNodes the SuperLink lists as online (``flwr supernode ls``)."""
        out = subprocess.run(
            ["flwr", "supernode", "ls", self.connection, "--format", "json"],
            env=env_for(self.flwr_home),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        nodes = json.loads(out.stdout).get("nodes", [])
        return [int(n["node-id"]) for n in nodes if n.get("status") == "online"]

    def wait_for_nodes(self, n: int, timeout: float = 120) -> list[int]:
        """Wait until exactly ``n`` SuperNodes are online; returns their IDs."""
        deadline = time.monotonic() + timeout
        while True:
            ids = self.node_ids()
            if len(ids) == n:
                return ids
            dead = [i for i, p in enumerate(self.nodes) if p is not None and p.poll() is not None]
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{len(ids)} SuperNode(s) online after {timeout:.0f} s, expected {n}; "
                    f"exited: {dead}; see {self.flwr_home}/supernode-*.log"
                )
            time.sleep(1)

    def close(self) -> None:
        """Stop every SuperNode, then the SuperLink (each with its descendants)."""
        try:
            for i in range(len(self.nodes)):
                self.stop_node(i)
        finally:
            if self.superlink is not None:
                stop_tree(self.superlink)


@contextmanager
def deployment(
    flwr_home: Path,
    cwd: Path,
    num_nodes: int,
    node_configs: list[dict[str, object]],
    tls_dir: Path | None = None,
    timeout: float = 90,
    superexec_poll_interval: float | None = SUPEREXEC_POLL_INTERVAL,
) -> Iterator[Deployment]:
    """A deployment-runtime SuperLink and ``num_nodes`` SuperNodes on loopback.

    Flower 1.42 serves the Fleet, Control and Runtime APIs on one HTTP port
    (``--host``/``--port``; ``--fleet-api-address`` and ``--control-api-address`` are
    deprecated): the SuperLink gets a free port, each SuperNode its own free
    ``--port`` (its ClientApp runtime API) and ``node_configs[i]`` as ``--node-config``.
    With ``tls_dir`` (from ``scripts/make_certs.sh``: ``ca.crt``, ``server.pem``,
    ``server.key``) everything runs over TLS, else ``--insecure``. The connection
    ``deployment`` is written to ``flwr_home/config.toml``. Nodes are started but not
    awaited: call :meth:`Deployment.wait_for_nodes`, or let the ServerApp wait
    (``federation.min_nodes``). Logs: ``flwr_home/superlink.log``, ``supernode-<i>.log``.
    ``superexec_poll_interval`` sets ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` for the nodes
    (how often a node's SuperExec looks for a message to start a ClientApp for; Flower's
    default is 1 s); None keeps Flower's default.
    """
    if len(node_configs) != num_nodes:
        raise ValueError(f"{len(node_configs)} node configs for {num_nodes} nodes")
    flwr_home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    dep = Deployment(
        flwr_home,
        cwd,
        f"127.0.0.1:{port}",
        node_configs,
        tls_dir,
        superexec_poll_interval=superexec_poll_interval,
    )
    _write_connection(flwr_home, dep.connection, dep.address, dep.ca)
    if tls_dir is not None:
        tls = [
            "--ssl-ca-certfile",
            str(tls_dir / "ca.crt"),
            "--ssl-certfile",
            str(tls_dir / "server.pem"),
            "--ssl-keyfile",
            str(tls_dir / "server.key"),
        ]
    else:
        tls = ["--insecure"]
    dep.superlink_args = tls
    try:
        dep.start_superlink(timeout)
        for i in range(num_nodes):
            dep.start_node(i)
        yield dep
    finally:
        dep.close()
