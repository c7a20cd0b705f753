"""The sweep report (``results.md``) is computed from the runs' files alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fml_flower.config import ConfigError, load_config, to_yaml
from tools.experiments import RunSpec, newcomer_curves, write_report


def _run(folder: Path, overrides: dict, accs: list[dict[int, float]]) -> None:
    """A finished run whose round r has the per-client personalized accuracies accs[r-1]."""
    folder.mkdir(parents=True)
    cfg = load_config("base", {"federation.num_rounds": len(accs), **overrides})
    (folder / "config.yaml").write_text(to_yaml(cfg))
    rounds = [{"round": 0, "seconds": 0.0}] + [
        {
            "round": r,
            "seconds": 1.0,
            "personal_acc": sum(a.values()) / len(a),
            "clients": {str(p): {"personal_acc": v} for p, v in a.items()},
        }
        for r, a in enumerate(accs, start=1)
    ]
    metrics = {"run": {"finished": "now", "wall_seconds": 3.0}, "rounds": rounds}
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_report_has_per_client_and_newcomer_tables(tmp_path: Path) -> None:
    joined = {"federation.join_round": "{2: 2}", "model.local_per_client": "{1: mlp}"}
    _run(
        tmp_path / "fml",
        joined,
        [{0: 0.5, 1: 0.7}, {0: 0.8, 1: 0.9, 2: 0.6}, {0: 0.9, 1: 0.9, 2: 0.95}],
    )
    _run(
        tmp_path / "local",
        {},
        [{0: 0.4, 1: 0.5, 2: 0.3}, {0: 0.6, 1: 0.6, 2: 0.5}, {0: 0.7, 1: 0.7, 2: 0.75}],
    )
    curves = newcomer_curves(tmp_path / "fml")
    assert curves[2] == [0.6, 0.95]  # rounds 2 and 3 = its first and second round
    assert curves[-1] == pytest.approx([0.6, 0.85, 0.9])  # mean of clients 0 and 1 in rounds 1..3
    runs = [RunSpec("fml", "base"), RunSpec("local", "base")]
    text = write_report("demo", tmp_path, runs).read_text()
    assert "| 1 | mlp / cnn | mnist5k | 90.00 | 70.00 |" in text  # fml mlp, local cnn
    assert "| 2 | cnn | mnist5k | 95.00 | 75.00 |" in text
    assert "| fml | 2 (joins) | personal | 60.00 | 95.00 |" in text
    assert (
        "| fml | from round 1 | personal | 60.00 | 85.00 |" in text
    )  # as many rounds as the newcomer had
    assert "| local |" not in text.split("New participants")[1]  # no join_round: no curve


def test_report_reads_runs_written_before_a_config_key_existed(tmp_path: Path) -> None:
    _run(tmp_path / "old", {}, [{0: 0.5, 1: 0.7}])
    cfg_file = tmp_path / "old" / "config.yaml"
    saved = yaml.safe_load(cfg_file.read_text())
    del saved["data"]["name_per_client"]  # as in runs made before the key was added
    cfg_file.write_text(yaml.safe_dump(saved))
    text = write_report("demo", tmp_path, [RunSpec("old", "base")]).read_text()
    assert "| 1 | cnn | mnist5k | 70.00 |" in text


def test_report_names_a_run_config_that_does_not_fit_the_schema(tmp_path: Path) -> None:
    _run(tmp_path / "odd", {}, [{0: 0.5}])
    cfg_file = tmp_path / "odd" / "config.yaml"
    saved = yaml.safe_load(cfg_file.read_text())
    saved["train"]["no_such_key"] = 1
    cfg_file.write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match=r"odd/config\.yaml: does not fit the current schema"):
        write_report("demo", tmp_path, [RunSpec("odd", "base")])


def test_p4_curve_groups_runs_by_method_and_n(tmp_path) -> None:
    import json

    from tools.p4_report import collect, main, table

    def run(name: str, acc: float, finished: bool = True) -> None:
        (tmp_path / name).mkdir()
        rnd = {
            "round": 30,
            "personal_acc": acc,
            "personal_acc_min": acc - 0.1,
            "personal_acc_max": acc + 0.1,
        }
        run_info = {"finished": "x"} if finished else {}
        (tmp_path / name / "metrics.json").write_text(
            json.dumps({"run": run_info, "rounds": [rnd]})
        )

    run("n100-fml", 0.40)
    run("n100-fml-seed43", 0.50)
    run("n100-local", 0.45)
    run("n3000-fml-alpha0.9", 0.70)
    run("n300-fml", 0.9, finished=False)  # interrupted: not reported
    groups = collect(tmp_path)
    assert sorted(groups) == [("fml", 100), ("fml (alpha 0.9)", 3000), ("local", 100)]
    text = table(groups)
    assert "| fml | 100 | 45.00 ± 7.07 | [30.00, 60.00] | 2 |" in text
    assert "| local | 100 | 45.00 (one seed) |" in text
    assert main(["--dir", str(tmp_path)]) == 0
    assert (tmp_path / "curve.png").stat().st_size > 0
