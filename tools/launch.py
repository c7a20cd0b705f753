"""Start a Flower SuperLink on loopback and run this app through ``flwr run``.

:func:`simulation_superlink` starts a simulation SuperLink; :func:`deployment` a
deployment-runtime SuperLink with real SuperNodes, over TLS with SuperNode
authentication if asked (see ``docs/deployment.md``).

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
import sys
import time
import tomllib
import urllib.request
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MAKE_NODE_KEYS = ROOT / "scripts" / "make_node_keys.sh"

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
            env=quiet_env(),
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


def quiet_env() -> dict[str, str]:
    """This process's environment, quiet and offline, with this Python's ``bin`` folder
    first on ``PATH``: Flower's commands (``flower-superlink``, which starts
    ``flower-superexec`` by name, ``flwr``) are the ones installed beside this interpreter,
    also when the venv was not activated (``.venv/bin/python -m tools.experiments``).
    """
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        path = os.pathsep.join([bin_dir, path]) if path else bin_dir
    return {**os.environ, **QUIET_ENV, "PATH": path}


def env_for(flwr_home: Path) -> dict[str, str]:
    """The environment for ``flwr`` commands: quiet, offline, private ``FLWR_HOME``."""
    return {**quiet_env(), "FLWR_HOME": str(flwr_home)}


def run_app(
    app_dir: Path,
    flwr_home: Path,
    connection: str,
    run_config: Mapping[str, object],
    num_supernodes: int | None,
    timeout: float = 900,
    num_cpus: int = 1,
    as_overrides: bool | None = None,
    num_gpus: float = 0.0,
) -> subprocess.CompletedProcess[str]:
    """``flwr run <app_dir> <connection> --stream`` with the given run-config.

    With ``as_overrides`` (by default: when the app's run-config declares ``overrides``, as
    fml-flower's does) every key but ``experiment`` travels in ``overrides``, which always
    applies; otherwise (another app, an older checkout) as plain ``key=value`` pairs.

    ``num_supernodes`` (simulation) is passed as ``--federation-config``; give ``None``
    for a deployment connection, whose SuperLink ignores a federation config (the
    SuperNodes that are connected take part). ``num_cpus`` is each simulated client's
    CPU share (``client-resources-num-cpus``): the number of clients trained at once is
    the machine's cores divided by it. ``num_gpus`` is its GPU share
    (``client-resources-num-gpus``; 0, the default, passes none: Ray then hides the GPUs
    from the clients).

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
            f"num-supernodes={num_supernodes} client-resources-num-cpus={num_cpus}"
            + (f" client-resources-num-gpus={num_gpus}" if num_gpus else ""),
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


def make_node_keys(out: Path, count: int, timeout: float = 60) -> list[Path]:
    """SuperNode authentication key pairs ``out/node<i>.key``/``.pub`` for ``i < count``.

    Runs ``scripts/make_node_keys.sh`` (ssh-keygen, ECDSA P-384, OpenSSH format: what
    Flower 1.42 loads); existing pairs are kept. Returns the private keys' paths.
    """
    subprocess.run(
        ["bash", str(MAKE_NODE_KEYS), str(out), str(count)],
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return [out / f"node{i}.key" for i in range(count)]


class Deployment:
    """A running SuperLink (deployment runtime) and its SuperNodes; see :func:`deployment`.

    ``connection`` names the SuperLink connection in ``flwr_home/config.toml``;
    ``address`` is the SuperLink's one ``host:port`` (Fleet, Control and Runtime APIs).
    With ``auth`` (SuperNode authentication, TLS only) node ``i`` signs its requests with
    ``keys_dir/node<i>.key``; :meth:`register_node` registers ``keys_dir/node<i>.pub``.
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
        auth: bool = False,
        keys_dir: Path | None = None,
    ) -> None:
        if auth and tls_dir is None:
            raise ValueError("SuperNode authentication needs TLS (tls_dir): Flower refuses it")
        self.flwr_home, self.cwd, self.address = flwr_home, cwd, address
        self.superexec_poll_interval = superexec_poll_interval
        self.node_configs, self.tls_dir, self.connection = node_configs, tls_dir, connection
        self.auth = auth
        self.keys_dir = (keys_dir or flwr_home / "node-keys") if auth else None
        self.nodes: list[subprocess.Popen | None] = [None] * len(node_configs)
        self.node_ports: list[int] = [free_port() for _ in node_configs]
        self.registered: list[int | None] = [None] * len(node_configs)
        """Node ``i``'s node ID from :meth:`register_node` (None: not registered)."""
        self.superlink: subprocess.Popen | None = None
        self.superlink_args: list[str] = []

    @property
    def ca(self) -> Path | None:
        """The CA certificate the clients trust (None: insecure)."""
        return self.tls_dir / "ca.crt" if self.tls_dir is not None else None

    def node_key(self, i: int) -> Path | None:
        """Node ``i``'s private key (``--auth-supernode-private-key``); None without auth."""
        return self.keys_dir / f"node{i}.key" if self.keys_dir is not None else None

    def node_public_key(self, i: int) -> Path | None:
        """Node ``i``'s public key (what ``flwr supernode register`` takes)."""
        return self.keys_dir / f"node{i}.pub" if self.keys_dir is not None else None

    def node_log(self, i: int) -> Path:
        """SuperNode ``i``'s log file (stdout and stderr, appended across restarts)."""
        return self.flwr_home / f"supernode-{i}.log"

    def supernode_command(self, i: int) -> list[str]:
        """The ``flower-supernode`` command line of node ``i``."""
        cmd = ["flower-supernode", "--superlink", self.address]
        cmd += ["--root-certificates", str(self.ca)] if self.ca is not None else ["--insecure"]
        if (key := self.node_key(i)) is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.node_ports[i])]
        if self.node_configs[i]:
            cmd += ["--node-config", node_config_arg(self.node_configs[i])]
        return cmd

    def _flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["flwr", *args],
            env=env_for(self.flwr_home),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def register_node(self, i: int) -> int:
        """Register node ``i``'s public key with the SuperLink (``flwr supernode register
        <node<i>.pub> <connection> --name node<i>``, Control API); returns its node ID, the
        ID the node gets whenever it connects with that key.
        """
        public_key = self.node_public_key(i)
        if public_key is None:
            raise RuntimeError("this deployment has no SuperNode authentication")
        out = self._flwr(
            "supernode",
            "register",
            str(public_key),
            self.connection,
            "--name",
            f"node{i}",
            "--format",
            "json",
        )
        try:
            reply = json.loads(out.stdout)
        except json.JSONDecodeError:
            reply = {}
        # `--format json` exits 0 also when the SuperLink refuses: read `success`
        if out.returncode != 0 or not reply.get("success"):
            raise RuntimeError(
                f"flwr supernode register {public_key} failed: {out.stdout}{out.stderr}"
            )
        self.registered[i] = int(reply["node-id"])
        return self.registered[i]

    def unregister_node(self, i: int) -> None:
        """Unregister node ``i``'s node ID (``flwr supernode unregister``): the SuperLink
        refuses its key from then on, for good (a key cannot be registered twice).
        """
        node_id = self.registered[i]
        if node_id is None:
            raise RuntimeError(f"SuperNode {i} is not registered")
        out = self._flwr("supernode", "unregister", str(node_id), self.connection)
        if out.returncode != 0:
            raise RuntimeError(f"flwr supernode unregister {node_id} failed: {out.stdout}")
        self.registered[i] = None

    def rekey_node(self, i: int) -> int:
        """Give node ``i`` a new identity: unregister its node ID, make a new key pair and
        register it; returns the new node ID (start the node afterwards).

        For a node that died mid-run and should rejoin without waiting: Flower answers
        the old ID's pending messages with an error as soon as the ID is unregistered,
        instead of when its heartbeat expires, and the new key is accepted at once.
        """
        if self.keys_dir is None:
            raise RuntimeError("this deployment has no SuperNode authentication")
        if (proc := self.nodes[i]) is not None and proc.poll() is None:
            raise RuntimeError(f"SuperNode {i} is running (PID {proc.pid}): stop it first")
        if self.registered[i] is not None:
            self.unregister_node(i)
        for suffix in (".key", ".pub"):
            (self.keys_dir / f"node{i}{suffix}").unlink(missing_ok=True)
        make_node_keys(self.keys_dir, i + 1)  # makes only the missing pair
        return self.register_node(i)

    def node_statuses(self) -> dict[int, str]:
        """Every node ID the SuperLink knows and its status (``registered``, ``online``,
        ``offline``, ``unregistered``), from ``flwr supernode ls``.
        """
        out = self._flwr("supernode", "ls", self.connection, "--format", "json")
        if out.returncode != 0:
            raise RuntimeError(f"flwr supernode ls failed: {out.stdout}{out.stderr}")
        nodes = json.loads(out.stdout).get("nodes", [])
        return {int(n["node-id"]): str(n.get("status")) for n in nodes}

    def node_ids(self) -> list[int]:
        """IDs of the SuperNodes the SuperLink lists as online (``flwr supernode ls``)."""
        return [node_id for node_id, status in self.node_statuses().items() if status == "online"]

    def wait_until_offline(self, node_id: int, timeout: float = 120) -> float:
        """Wait until the SuperLink no longer lists ``node_id`` as online; returns the
        seconds waited. A SuperNode that died without deactivating stays online until
        its heartbeat expires (up to 60 s after its last heartbeat in Flower 1.42).
        """
        start = time.monotonic()
        while self.node_statuses().get(node_id) == "online":
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"node {node_id} still online after {timeout:.0f} s")
            time.sleep(1)
        return time.monotonic() - start

    def start_node(self, i: int, timeout: float = 120) -> subprocess.Popen:
        """Start SuperNode ``i`` (again) with its node config; it connects on its own.

        With authentication a restarted node comes back under its registered node ID.
        Flower activates that ID only when the SuperLink does not list it as online
        (``activate_node`` in ``flwr/server/superlink/linkstate/sql_linkstate.py``), and a
        node that died without deactivating stays online until its heartbeat expires; a
        node started before that exits at once (``[code: 2004] Failed to activate
        SuperNode``). So the harness first waits (up to ``timeout`` seconds) until the ID is
        no longer online, and the node keeps its node ID. The round that was waiting for
        the dead node still waits until that expiry; :meth:`rekey_node` before the start
        avoids that, at the price of a new node ID. (With the SuperLink down there is
        nothing to ask: the node is started at once and connects when the SuperLink is back.)
        """
        if (old := self.nodes[i]) is not None and old.poll() is None:
            raise RuntimeError(f"SuperNode {i} is already running (PID {old.pid})")
        link_up = self.superlink is not None and self.superlink.poll() is None
        if old is not None and link_up and (node_id := self.registered[i]) is not None:
            self.wait_until_offline(node_id, timeout)
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
        """Stop SuperNode ``i`` (SIGTERM: it deactivates, and without authentication also
        unregisters); returns its exit code.
        """
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
    auth: bool | None = None,
    keys_dir: Path | None = None,
    unregistered: Collection[int] = (),
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

    ``auth`` (default: on exactly when ``tls_dir`` is given; Flower allows it only over
    TLS): SuperNode authentication. The SuperLink runs with ``--enable-supernode-auth``;
    key pairs ``keys_dir/node<i>.key``/``.pub`` (default ``flwr_home/node-keys``; made
    with ``scripts/make_node_keys.sh`` where missing) are made, each public key is
    registered (:meth:`Deployment.register_node`), and each SuperNode starts with
    ``--auth-supernode-private-key``. Nodes listed in ``unregistered`` get a key pair
    that is not registered (for tests: the SuperLink refuses them).
    """
    if len(node_configs) != num_nodes:
        raise ValueError(f"{len(node_configs)} node configs for {num_nodes} nodes")
    if auth is None:
        auth = tls_dir is not None
    if unregistered and not auth:
        raise ValueError("`unregistered` nodes need SuperNode authentication")
    flwr_home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    dep = Deployment(
        flwr_home,
        cwd,
        f"127.0.0.1:{port}",
        node_configs,
        tls_dir,
        superexec_poll_interval=superexec_poll_interval,
        auth=auth,
        keys_dir=keys_dir,
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
    dep.superlink_args = tls + (["--enable-supernode-auth"] if auth else [])
    if dep.keys_dir is not None and num_nodes:
        make_node_keys(dep.keys_dir, num_nodes)
    try:
        dep.start_superlink(timeout)
        for i in range(num_nodes):
            if dep.auth and i not in unregistered:
                dep.register_node(i)
        for i in range(num_nodes):
            dep.start_node(i)
        yield dep
    finally:
        dep.close()
