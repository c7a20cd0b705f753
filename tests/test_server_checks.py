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
