"""``docs/deployment.md`` runs as written: its command blocks, on loopback.

Each ``bash`` block of the page is preceded by an HTML comment saying what this test does
with it::

    <!-- docs-test: env -->                    run first in every block's shell
    <!-- docs-test: run SCENARIO [NAME] -->    run to completion (bounded), must exit 0
    <!-- docs-test: start SCENARIO NAME -->    started in the background (a SuperLink, the
                                               SuperNodes), stopped by PID at the end
    <!-- docs-test: skip -->                   not run; the page says why, next to it

and ``<!-- docs-test: output SCENARIO NAME -->`` before a ``text`` block quotes what block
NAME printed: every quoted line must occur in that output (``<...>`` matches anything).
A scenario's blocks run in page order, in a fresh folder, with free ports instead of the
page's (8000, 9094, ...), the repository's ``scripts/`` and app (``flwr run .``), and
temporary state folders instead of ``$HOME/fml-state``: nothing else is changed.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tools.launch import run_status, stop_tree

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "deployment.md"
MARKER = re.compile(r"^<!--\s*docs-test:\s*(.*?)\s*-->\s*$")
KINDS = {"env", "run", "start", "skip", "output"}
SKIP_NOTE = "Not run by `tests/test_docs_deployment.py`"
NODES = 3
"""The page's federation: SuperNodes 0, 1 and 2."""
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Block:
    """A fenced block of the page and the marker before it."""

    lang: str
    text: str
    line: int
    kind: str | None = None
    scenario: str | None = None
    name: str | None = None
    preface: str = ""
    """The page's text between the previous block and this one."""


def doc_blocks(text: str) -> list[Block]:
    """The fenced blocks of ``text``, each with its ``docs-test`` marker (if any)."""
    blocks: list[Block] = []
    marker: list[str] | None = None
    preface: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := MARKER.match(line):
            assert marker is None, f"line {i + 1}: two docs-test markers for one block"
            marker = m.group(1).split()
        elif line.startswith("```") and line.strip() != "```":
            end = lines.index("```", i + 1)
            block = Block(line[3:].strip(), "\n".join(lines[i + 1 : end]) + "\n", i + 1)
            if marker is not None:
                block.kind = marker[0]
                block.scenario = marker[1] if len(marker) > 1 else None
                block.name = marker[2] if len(marker) > 2 else None
            block.preface = "\n".join(preface)
            blocks.append(block)
            marker, preface, i = None, [], end
        else:
            preface.append(line)
        i += 1
    return blocks


def _free_range(n: int, taken: set[int]) -> int:
    """A port ``p`` with ``p .. p + n - 1`` free on 127.0.0.1 and not in ``taken``."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            base = int(sock.getsockname()[1])
        ports = range(base, base + n)
        if base + n > 65535 or taken & set(ports):
            continue
        try:
            for p in ports:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", p))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range")


def port_map(blocks: list[Block]) -> dict[int, int]:
    """A free port for each port number (8000-9999) the blocks use; each gets ``NODES``
    free ports in a row, for ``$((9094 + i))``.
    """
    mapping: dict[int, int] = {}
    taken: set[int] = set()
    for block in blocks:
        for number in re.findall(r"\b[89]\d{3}\b", block.text):
            if int(number) not in mapping:
                base = _free_range(NODES, taken)
                mapping[int(number)] = base
                taken |= set(range(base, base + NODES))
    return mapping


def substitute(text: str, ports: dict[int, int], folder: Path) -> str:
    """``text`` with the page's ports, ``scripts/``, app folder, venv and state folders
    replaced by what this test uses; nothing else changes.
    """
    text = re.sub(r"\b[89]\d{3}\b", lambda m: str(ports[int(m.group())]), text)
    activate = Path(sys.prefix) / "bin" / "activate"
    text = re.sub(
        r"(?m)^\. \.venv/bin/activate",
        f". {activate}" if activate.is_file() else ":",
        text,
    )
    text = re.sub(r"(?<![\w/.$-])scripts/", f"{ROOT}/scripts/", text)
    text = text.replace("flwr run . ", f"flwr run {ROOT} ")
    return text.replace("$HOME/fml-state", f"{folder}/fml-state")


def output_matches(quote: str, output: str) -> list[str]:
    """The lines of ``quote`` that do not occur in ``output`` (whitespace runs count as
    one space; ``<...>`` stands for anything).
    """
    flat = re.sub(r"\s+", " ", ANSI.sub("", output))
    missing = []
    for line in quote.splitlines():
        line = re.sub(r"\s+", " ", line.strip())
        if not line:
            continue
        parts = re.split(r"<[^<>]*>", line)
        if not re.search(".*?".join(re.escape(p) for p in parts), flat):
            missing.append(line)
    return missing


class Scenario:
    """A scenario's blocks run in a folder of their own; started blocks stopped by PID."""

    def __init__(self, name: str, blocks: list[Block], folder: Path) -> None:
        self.name, self.folder = name, folder
        folder.mkdir(parents=True, exist_ok=True)
        self.blocks = [b for b in blocks if b.scenario == name]
        self.env_text = "".join(b.text for b in blocks if b.kind == "env")
        self.ports = port_map([*self.blocks, *(b for b in blocks if b.kind == "env")])
        self.started: list[subprocess.Popen] = []
        self.outputs: dict[str, Path] = {}
        self.environ = {  # the page's Environment block sets the rest
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            "HOME": os.environ.get("HOME", ""),
            "COLUMNS": "200",
        }
        self.flwr_home = Path(self.shell_value("$FLWR_HOME"))

    def script(self, block: Block) -> str:
        body = substitute(self.env_text + block.text, self.ports, self.folder)
        return f"set -e -o pipefail\n{body}"

    def shell_value(self, expression: str) -> str:
        env = substitute(self.env_text, self.ports, self.folder)
        out = subprocess.run(
            ["bash", "-c", f"{env}\necho {expression}"],
            cwd=self.folder,
            env=self.environ,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout.strip().splitlines()[-1]

    def _popen(self, block: Block, log: Path) -> subprocess.Popen:
        with log.open("w") as fh:
            return subprocess.Popen(
                ["bash", "-c", self.script(block)],
                cwd=self.folder,
                env=self.environ,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def run(self, block: Block, timeout: float) -> str:
        """Run ``block`` to completion; its output (it must exit 0)."""
        log = self.folder / f"block-{block.line}.log"
        proc = self._popen(block, log)
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"docs line {block.line}: still running after {timeout:.0f} s")
        finally:
            stop_tree(proc)  # and whatever it left behind
        text = log.read_text()
        assert returncode == 0, f"docs line {block.line} exited {returncode}:\n{text[-3000:]}"
        if block.name:
            self.outputs[block.name] = log
        return text

    def start(self, block: Block) -> None:
        """Start ``block`` in the background (its own session), to be stopped by PID."""
        assert block.name, f"docs line {block.line}: a started block needs a name"
        log = self.folder / f"{block.name}.log"
        self.started.append(self._popen(block, log))
        self.outputs[block.name] = log

    def stop(self) -> None:
        """Stop the started blocks' processes, the last started first, by PID."""
        for proc in reversed(self.started):
            stop_tree(proc)

    def superlink_port(self) -> int:
        return self.ports[8000]

    def wait_healthy(self, block: Block, timeout: float = 120) -> None:
        """Wait until the SuperLink that ``block`` started answers ``/health``."""
        secure = "--ssl-certfile" in block.text
        context = (
            ssl.create_default_context(cafile=str(self.folder / "certs" / "ca.crt"))
            if secure
            else None
        )
        url = f"{'https' if secure else 'http'}://127.0.0.1:{self.superlink_port()}/health"
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.started[-1].poll() is not None:
                log = self.outputs[block.name or ""].read_text()
                pytest.fail(f"the SuperLink of docs line {block.line} did not start:\n{log}")
            time.sleep(0.5)

    def nodes(self) -> dict[int, str]:
        """Node ID -> status, from ``flwr supernode ls deployment --format json``."""
        out = subprocess.run(
            ["flwr", "supernode", "ls", "deployment", "--format", "json"],
            cwd=self.folder,
            env={**self.environ, "FLWR_HOME": str(self.flwr_home)},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return {int(n["node-id"]): n["status"] for n in json.loads(out.stdout)["nodes"]}

    def wait_online(self, n: int, timeout: float = 180) -> set[int]:
        """Wait until ``n`` SuperNodes are online; their IDs."""
        deadline = time.monotonic() + timeout
        while True:
            online = {i for i, status in self.nodes().items() if status == "online"}
            if len(online) == n:
                return online
            if time.monotonic() > deadline:
                logs = "".join(p.read_text()[-1500:] for p in self.folder.glob("supernode-*.log"))
                pytest.fail(f"{len(online)} of {n} SuperNodes online after {timeout} s:\n{logs}")
            time.sleep(1)

    def play(self, run_timeout: float = 900) -> None:
        """Run the scenario's blocks in page order (checking started ones come up)."""
        for block in self.blocks:
            if block.kind == "run":
                self.run(block, run_timeout if block.name == "run" else 180)
            elif block.kind == "start":
                self.start(block)
                if block.name == "superlink":
                    self.wait_healthy(block)
                if block.name == "nodes" and (self.flwr_home / "config.toml").is_file():
                    self.wait_online(NODES)
            elif block.kind != "output":
                raise AssertionError(f"docs line {block.line}: unknown kind {block.kind}")

    def check_quotes(self) -> None:
        """Every ``output`` block's lines occur in the output it quotes."""
        for block in self.blocks:
            if block.kind == "output":
                assert block.name in self.outputs, f"docs line {block.line}: no {block.name}"
                output = self.outputs[block.name].read_text()
                missing = output_matches(block.text, output)
                assert not missing, (block.line, missing, ANSI.sub("", output)[-3000:])


@pytest.fixture(scope="module")
def blocks() -> list[Block]:
    return doc_blocks(DOC.read_text())


def test_every_command_block_says_how_it_is_tested(blocks: list[Block]) -> None:
    bash = [b for b in blocks if b.lang == "bash"]
    assert len(bash) >= 10
    for block in bash:
        assert block.kind in KINDS - {"output"}, f"docs line {block.line}: no docs-test marker"
        if block.kind == "skip":
            assert SKIP_NOTE in block.preface, f"docs line {block.line}: say why it is skipped"
        if block.kind in ("run", "start"):
            assert block.scenario, f"docs line {block.line}: no scenario"
    for block in blocks:
        if block.kind == "output":
            assert block.lang == "text"
            named = [b for b in bash if (b.scenario, b.name) == (block.scenario, block.name)]
            assert len(named) == 1, f"docs line {block.line}: quotes no block"
        elif block.lang != "bash":
            assert block.kind is None, f"docs line {block.line}: a marker on a {block.lang} block"
    assert sum(b.kind == "env" for b in blocks) == 1


def test_substitution_changes_only_ports_and_folders(blocks: list[Block], tmp_path: Path) -> None:
    secure = [b for b in blocks if b.scenario == "secure"]
    ports = port_map(secure)
    assert {8000, 8001, 9094, 9098, 9099} <= set(ports)
    nodes = next(b for b in secure if b.name == "nodes")
    text = substitute(nodes.text, ports, tmp_path)
    assert f"--port $(({ports[9094]} + i))" in text and "9094" not in text
    assert f'state-dir=\\"{tmp_path}/fml-state/node$i\\"' in text
    assert f"--superlink 127.0.0.1:{ports[8000]}" in text
    for block in blocks:  # undoing the substitutions gives the page's text back
        if block.kind in ("run", "start"):
            used_ports = ports | port_map([block])
            back = substitute(block.text, used_ports, tmp_path)
            for page, used in used_ports.items():
                back = back.replace(str(used), str(page))
            back = back.replace(f"{tmp_path}/fml-state", "$HOME/fml-state")
            back = back.replace(f"{ROOT}/scripts/", "scripts/")
            assert back.replace(f"flwr run {ROOT} ", "flwr run . ") == block.text
    first = substitute(secure[0].text, ports, tmp_path)
    assert f"{ROOT}/scripts/make_certs.sh certs" in first
    assert f"{ROOT}/scripts/make_node_keys.sh keys 3" in first
    run = next(b for b in secure if b.name == "run")
    assert f"flwr run {ROOT} deployment" in substitute(run.text, ports, tmp_path)
    # the documented 3-node run uses a split that reaches every class with 3 clients
    assert 'data.partitioner="shard"' in run.text and "federation.min_nodes=3" in run.text
    assert "num-partitions=3" in nodes.text
    assert output_matches("a <x> c\nb", "\x1b[91ma\x1b[0m  zz c\nb") == []
    assert output_matches("a <x> d", "a b c") == ["a <x> d"]


@pytest.mark.deployment
@pytest.mark.slow
def test_the_documented_secure_deployment_runs_as_written(
    blocks: list[Block], tmp_path: Path
) -> None:
    """Certificates and keys, SuperLink with authentication, registration, 3 SuperNodes,
    a one-round run; a node with an unregistered key and a node with a wrong address,
    with the output the page quotes.
    """
    scenario = Scenario("secure", blocks, tmp_path / "secure")
    try:
        scenario.play()
        registered = {
            int(n)
            for n in re.findall(
                r"SuperNode (\d+) registered successfully", scenario.outputs["register"].read_text()
            )
        }
        assert len(registered) == NODES
        assert scenario.wait_online(NODES, timeout=60) == registered
        status = run_status(scenario.flwr_home, "deployment")
        scenario.check_quotes()
    finally:
        scenario.stop()
    assert [r["status"] for r in status] == ["finished:completed"]
    metrics = json.loads((scenario.folder / "outputs" / "dep" / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["clients_trained"] == NODES and rounds[1]["replies_dropped"] == 0
    assert set(rounds[1]["clients"]) == {"0", "1", "2"}
    superlink_log = scenario.outputs["superlink"].read_text()
    assert superlink_log.count("[ApiError:2004]") == 1  # the intruder, and only it
    for i in range(NODES):
        log = (scenario.folder / f"supernode-{i}.log").read_text()
        assert re.search(r"SuperNode ID: (\d+)", log), log[-2000:]
        assert int(re.search(r"SuperNode ID: (\d+)", log).group(1)) in registered  # type: ignore[union-attr]


@pytest.mark.deployment
def test_the_documented_insecure_deployment_starts_as_written(
    blocks: list[Block], tmp_path: Path
) -> None:
    """The insecure variant: SuperLink, 3 SuperNodes, the CLI connection; the nodes come
    online (the run is the secure scenario's, not repeated here).
    """
    scenario = Scenario("insecure", blocks, tmp_path / "insecure")
    try:
        scenario.play()
        assert len(scenario.wait_online(NODES, timeout=180)) == NODES
    finally:
        scenario.stop()
    assert "SuperNode authentication is disabled" in scenario.outputs["superlink"].read_text()
