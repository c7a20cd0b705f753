"""Stage fml-flower for Flower Hub and check it with Flower 1.42's own publishing rules.

    python -m tools.hub stage /tmp/fml-flower      # then: cd /tmp/fml-flower && flwr app publish

``flwr app publish`` uploads every file of the app folder that its patterns take (``*.py``,
``*.toml``, ``*.md``, ``*.yaml``, ``*.json``, ``LICENSE``, ...) and ``.gitignore`` does not
exclude, within limits: at most 1,000 files, 1 MB each, 10 MB in all, UTF-8, a
``[project].description`` of at most 200 characters, an app folder named like an app (a
letter first, then letters, digits and hyphens, at most 32). This repository's committed
results (``docs/results/``, ``docs/performance/``: the evidence, not the app) exceed the
total, so the published app is a staged copy without them. :func:`hub_check` runs Flower's
own checks (``flwr.cli.app_cmd.publish``) on a folder, without uploading anything.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LEFT_OUT = ("docs/results/", "docs/performance/")
"""Committed folders that stay out of the published app: measured results, not the app."""


def published_files(root: Path = ROOT) -> list[str]:
    """The committed files (``git ls-files``) that Flower's publish patterns take, without
    :data:`LEFT_OUT`, as POSIX paths relative to ``root``.
    """
    from flwr.cli.utils import filter_paths_for_publish

    tracked = subprocess.run(
        ["git", "-C", str(root), "ls-files"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    files: dict[str, Path | bytes] = {name: root / name for name in tracked}
    if (root / ".gitignore").is_file():
        files[".gitignore"] = (root / ".gitignore").read_bytes()
    kept = filter_paths_for_publish(files)
    return sorted(name for name in kept if not name.startswith(LEFT_OUT))


def stage(target: Path, root: Path = ROOT) -> list[str]:
    """Copy the published files into ``target`` (which must not exist); return them."""
    if target.exists():
        raise FileExistsError(f"{target} exists: stage into a new folder")
    names = published_files(root)
    for name in names:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target / name)
    return names


def hub_check(folder: Path) -> None:
    """Flower's publish checks on ``folder`` (app name, description, file types, sizes and
    encoding; the license file if declared); raises ``click.ClickException`` naming the
    first problem. Nothing is uploaded.
    """
    from flwr.cli.app_cmd.publish import (
        _collect_file_paths,
        _validate_app_name,
        _validate_description,
        _validate_files,
    )
    from flwr.cli.config_utils import load_and_validate
    from flwr.common.constant import FAB_CONFIG_FILE

    config, _ = load_and_validate(folder / FAB_CONFIG_FILE, check_module=False)
    _validate_app_name(folder.name, "Flower App directory name")
    _validate_description(config["project"].get("description", ""))
    _validate_files(_collect_file_paths(folder))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    stage_cmd = sub.add_parser("stage", help="copy the app to publish into a new folder")
    stage_cmd.add_argument("target", type=Path, help="a new folder, named like the app")
    args = parser.parse_args(argv)
    names = stage(args.target.resolve())
    print(f"staged {len(names)} files in {args.target}")
    hub_check(args.target.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
