"""Configuration the server can only check where it runs is refused before any folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fml_flower.config import ConfigError, load_config
from server_app.app import run_fml


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_cuda_device_without_a_gpu_is_refused_before_any_results_folder(tmp_path: Path) -> None:
    cfg = load_config("base", {"train.device": "cuda", "output.dir": str(tmp_path / "out")})
    with pytest.raises(ConfigError, match=r"train\.device: device 'cuda' requested but torch"):
        run_fml(None, cfg)  # type: ignore[arg-type]  # fails before it touches the grid
    assert not (tmp_path / "out").exists()


def test_the_servers_data_preparation_runs_in_a_child_process(tmp_path: Path) -> None:
    """The ServerApp prepares the data in a child process: the same split records, inputs
    and central test set as in-process, the clients' partitions written, the check's
    ConfigError passed on as it is, and no dataset library in the ServerApp's process."""
    import subprocess
    import sys

    from server_app.app import prepare_data

    cfg = load_config("base", {"data.partitioner": "shard"})  # 4 clients: every class used
    here = prepare_data(cfg.data, 4, None, in_child=False)
    child = prepare_data(cfg.data, 4, tmp_path / "parts", in_child=True)
    assert child.split == here.split and child.info == here.info
    assert torch.equal(child.central.x, here.central.x)
    assert torch.equal(child.central.y, here.central.y)
    assert len(list((tmp_path / "parts").glob("partition-p*.pt"))) == 4
    missing = load_config("base", {}).data  # first-deterministic, 3 clients x 2 classes
    with pytest.raises(ConfigError, match=r"classes \[.*\] of 'mnist5k' reach no client"):
        prepare_data(missing, 3, None, in_child=True)
    check = (
        "import sys, server_app.app; "
        "assert not {'datasets', 'flwr_datasets'} & set(sys.modules), 'imported'"
    )
    proc = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
