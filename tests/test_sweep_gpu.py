"""A sweep on a machine with a GPU gives every simulated client a GPU share: without one,
Ray hides the GPUs from the clients and ``train.device: auto`` trains on the CPU."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import tools.launch
from fml_flower.config import ConfigError
from tools.experiments import client_gpu_share, load_sweep

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_share_per_client() -> None:
    assert client_gpu_share(None, num_cpus=2, gpus=0, cores=2) == 0.0  # this CPU machine
    assert client_gpu_share(None, num_cpus=2, gpus=1, cores=16) == 0.125  # 8 clients at once
    assert client_gpu_share(None, num_cpus=1, gpus=1, cores=1) == 1.0
    assert client_gpu_share(None, num_cpus=4, gpus=2, cores=4) == 1.0  # at most one GPU each
    assert client_gpu_share(None, num_cpus=2, gpus=1, cores=12) == 0.1666  # 6 fit in one GPU
    assert client_gpu_share(0.5, num_cpus=2, gpus=0, cores=2) == 0.5  # given: as is
    assert client_gpu_share(0.0, num_cpus=2, gpus=1, cores=16) == 0.0  # CPU on purpose


def test_sweep_file_num_gpus_is_checked(tmp_path: Path) -> None:
    (tmp_path / "sweeps").mkdir()
    for name in ("base.yaml",):
        (tmp_path / name).write_text((ROOT / "conf" / name).read_text())
    sweep = tmp_path / "sweeps" / "g.yaml"
    sweep.write_text("num_gpus: 0.25\nruns:\n  - {name: a}\n  - {name: b, num_gpus: 0}\n")
    assert [r.num_gpus for r in load_sweep("g", tmp_path)] == [0.25, 0.0]
    sweep.write_text("runs:\n  - {name: a}\n")
    assert load_sweep("g", tmp_path)[0].num_gpus is None  # decided when the sweep runs
    sweep.write_text("runs:\n  - {name: a, num_gpus: 2}\n")
    with pytest.raises(ConfigError, match=r"run a: num_gpus must be a number in \[0, 1\]"):
        load_sweep("g", tmp_path)


@pytest.mark.parametrize(
    ("share", "expected"), [(0.0, ""), (0.25, " client-resources-num-gpus=0.25")]
)
def test_run_app_passes_the_gpu_share(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, share: float, expected: str
) -> None:
    seen: list[list[str]] = []

    def fake_run(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(tools.launch.subprocess, "run", fake_run)
    tools.launch.run_app(ROOT, tmp_path, "local", {"experiment": "base"}, 3, num_gpus=share)
    federation = seen[0][seen[0].index("--federation-config") + 1]
    assert federation == "num-supernodes=3 client-resources-num-cpus=1" + expected


def test_a_gpu_share_without_a_gpu_is_refused_before_anything_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import tools.experiments

    monkeypatch.setattr(tools.experiments, "torch_gpus", lambda: 0)
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "g.yaml").write_text("runs:\n  - {name: a}\n")
    with pytest.raises(ConfigError, match=r"sweep g: a GPU share per client \(0.5\)"):
        tools.experiments.run_sweep("g", tmp_path / "out", conf_dir=tmp_path, num_gpus=0.5)
    assert not (tmp_path / "out").exists()  # nothing written
