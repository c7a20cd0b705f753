"""Past one machine: the simulation attached to a running Ray cluster (a head node started
with ``ray start --head`` on 127.0.0.1), the multi-host recipe of ``docs/performance.md``
tested on loopback. Everything started here is stopped by PID."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from tools.experiments import tree_processes
from tools.launch import ray_head, run_app, run_status, simulation_superlink

ROOT = Path(__file__).resolve().parent.parent


class _Watch:
    """Samples the names of the processes under two PIDs while a run goes on."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids, self.seen = pids, {k: set() for k in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for key, pid in self.pids.items():
                self.seen[key] |= {name for name, _ in tree_processes(pid)}


@pytest.mark.simulation
@pytest.mark.slow
def test_the_simulation_runs_on_an_existing_ray_cluster(tmp_path: Path) -> None:
    if shutil.which("ray") is None:
        pytest.fail("the `ray` command (flwr[simulation]'s Ray) is not on PATH")
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Unix socket paths
    flwr_home, out, state = tmp_path / "flwr", tmp_path / "out", tmp_path / "state"
    try:
        with ray_head(ray_tmp, num_cpus=2) as address:
            with simulation_superlink(flwr_home, cwd=tmp_path, ray_address=address) as (
                connection,
                superlink_pid,
            ):
                head = _head_pid(ray_tmp)
                with _Watch({"superlink": superlink_pid, "head": head}) as watch:
                    proc = run_app(
                        ROOT,
                        flwr_home,
                        connection,
                        {
                            "federation.num_rounds": 2,
                            "data.partitioner": "shard",
                            "model.meme": "mlp",
                            "model.local": "mlp",
                            "federation.state_dir": str(state),
                            "output.dir": str(out),
                            "output.run_name": "ray",
                        },
                        num_supernodes=4,
                        timeout=600,
                    )
                status = run_status(flwr_home, connection)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)  # the stopped cluster's logs and sockets
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and status[-1]["status"] == "finished:completed", log[-3000:]
    rounds = json.loads((out / "ray" / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[-1]["clients_trained"] == 4
    # the clients ran as workers of the existing cluster; the SuperLink started no Ray of its own
    assert "ray::ClientAppActor" in {n.split(".")[0] for n in watch.seen["head"]}, watch.seen
    assert not {"raylet", "gcs_server"} & watch.seen["superlink"], watch.seen["superlink"]
    # federation.state_dir: every client's personalized state in one node-local file
    assert sorted(p.name for p in state.glob("personal-p?.ckpt")) == [
        f"personal-p{i}.ckpt" for i in range(4)
    ]


def _head_pid(ray_tmp: Path) -> int:
    """The PID of the head's ``raylet`` (its arguments name the head's temp dir), whose
    children are the cluster's workers."""
    from tools.launch import _processes

    for pid, (_, _, _, argv) in _processes().items():
        if argv and Path(argv[0]).name == "raylet" and any(str(ray_tmp) in a for a in argv):
            return pid
    raise AssertionError(f"no raylet of the head under {ray_tmp}")
