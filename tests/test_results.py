"""The results folder's files and the end-of-run summary."""

from __future__ import annotations

import json
from pathlib import Path

from fml_flower.results import RunRecorder, plot_run, summary_table


def _rounds() -> list[dict]:
    out = [{"round": 0, "central_acc": 0.1, "seconds": 0.0}]
    for r, (p, g) in enumerate([(0.5, 0.2), (0.9, 0.4), (0.8, 0.5)], start=1):
        out.append(
            {
                "round": r,
                "personal_acc": p,
                "personal_acc_min": p - 0.1,
                "personal_acc_max": p + 0.05,
                "global_acc": g,
                "central_acc": g,
                "seconds": 1.0,
                "clients": {"0": {"personal_acc": p}},
            }
        )
    out.append(
        {"round": 4, "personal_acc": None, "global_acc": None, "central_acc": 0.6, "seconds": 1.0}
    )  # a round without client evaluation
    return out


def test_recorder_writes_json_csv_and_plots(tmp_path: Path) -> None:
    rec = RunRecorder(tmp_path / "run", {"method": "fml"}, "seed: 1\n")
    for r in _rounds():
        rec.add_round(r)
    rec.finish(seconds=3.0)
    data = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["round"] for r in data["rounds"]] == [0, 1, 2, 3, 4]
    assert data["run"]["seconds"] == 3.0
    csv_lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("round,personal_acc") and len(csv_lines) == 6
    written = plot_run(tmp_path / "run")
    assert [p.name for p in written] == ["accuracy.png", "clients.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_summary_reports_final_mean_and_best() -> None:
    table = summary_table(_rounds()[:4])
    personal = next(line for line in table.splitlines() if line.startswith("personalized"))
    assert personal.split()[3:] == ["0.8000", "0.7333", "0.9000", "(2)"]


def test_tensorboard_events_are_written_when_asked(tmp_path: Path) -> None:
    import pytest

    pytest.importorskip("tensorboard", reason="the optional tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rec = RunRecorder(tmp_path / "run", {}, "", tensorboard=True)
    for r in _rounds():
        rec.add_round(r)
    rec.finish()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("personal_acc")] == pytest.approx([0.5, 0.9, 0.8])


def test_committed_docs_and_results_name_no_machine_paths() -> None:
    """Raw metrics, configs and docs travel to other machines: no absolute home/work/tmp
    paths of the machine that wrote them (the sweep records output.dir relative).
    """
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = subprocess.run(
        ["git", "ls-files", "docs", "conf", "examples", "README.md"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    pattern = re.compile(r"""(?:^|[\s"'=(])/(?:home|root|work|tmp|Users)/""")
    bad = []
    for name in files:
        path = root / name
        if path.suffix in {".png", ".ckpt", ".pt"} or not path.is_file():
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                bad.append(f"{name}:{i}: {line.strip()[:80]}")
    assert bad == []
