"""Packaging: the wheel carries the code and the default configs; the FAB carries no data."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fml_flower

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.packaging
def test_wheel_installs_packages_and_configs(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"fml_flower", "strategies", "client_app", "server_app"}
    assert "fml_flower/conf/base.yaml" in names and "fml_flower/conf/p1.yaml" in names
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    probe = (
        "from fml_flower.config import CONF_DIR, load_config; "
        "print(CONF_DIR); load_config('p1') if False else load_config()"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={**os.environ, "PYTHONPATH": str(target)},
    )
    assert out.stdout.strip() == str(target / "fml_flower" / "conf")


@pytest.mark.packaging
def test_flwr_build_makes_a_small_fab_without_data(tmp_path: Path) -> None:
    clone = tmp_path / "app"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    subprocess.run(["flwr", "build"], cwd=clone, check=True, capture_output=True, timeout=300)
    (fab,) = clone.glob("*.fab")
    assert fab.stat().st_size < 10 * 1024 * 1024
    names = zipfile.ZipFile(fab).namelist()
    assert "conf/base.yaml" in names and "client_app/app.py" in names
    assert "fml_flower/methods/fedrep.py" in names and "strategies/fml.py" in names
    assert not [n for n in names if n.endswith((".npz", ".parquet", ".ckpt", ".pt"))]
    tops = {n.split("/")[0] for n in names if "/" in n}
    assert tops - {".info"} == {"fml_flower", "strategies", "client_app", "server_app", "conf"}
    assert fab.stat().st_size < 1024 * 1024  # code and YAML only: docs/results stay out


def test_the_domain_core_is_plain_pytorch() -> None:
    """fml_flower/ starts no processes and imports no Flower runtime (flwr-datasets, for
    partitioning, is the one Flower package it uses), nor the apps or the tooling.
    """
    import ast

    forbidden = ("subprocess", "flwr", "client_app", "server_app", "strategies", "tools")
    found = []
    for path in sorted((ROOT / "fml_flower").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in forbidden:
                    found.append(f"{path.relative_to(ROOT)}: {name}")
    assert found == []


def test_version_has_one_source() -> None:
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as fh:
        assert fml_flower.__version__ == tomllib.load(fh)["project"]["version"]


@pytest.mark.packaging
def test_the_app_stages_for_flower_hub_within_its_limits(tmp_path: Path) -> None:
    """What ``flwr app publish`` would upload passes Flower 1.42's own checks (file types,
    1 MB per file, 10 MB and 1,000 files in all, UTF-8, description, app name), carries
    the license, and keeps the committed results out.
    """
    from tools.hub import hub_check, stage

    target = tmp_path / "fml-flower"
    names = stage(target)
    hub_check(target)  # raises click.ClickException naming the first problem
    assert "LICENSE" in names and "pyproject.toml" in names and "README.md" in names
    assert "strategies/fml.py" in names and "conf/base.yaml" in names
    assert not [n for n in names if n.startswith("docs/results/")]
    assert "Apache License" in (target / "LICENSE").read_text()
