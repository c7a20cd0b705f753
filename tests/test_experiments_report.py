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


def _finished(folder: Path, personal: list[float], central: float, clients: dict) -> None:
    """A finished run: its rounds' personalized accuracies, the final central one."""
    folder.mkdir(parents=True)
    cfg = load_config("base", {"federation.num_rounds": len(personal)})
    (folder / "config.yaml").write_text(to_yaml(cfg))
    rounds = [{"round": 0, "seconds": 0.0}] + [
        {"round": r, "personal_acc": v, "central_acc": central, "clients": clients}
        for r, v in enumerate(personal, start=1)
    ]
    run = {"finished": "now", "commit": "abcdef0123", "machine": "cpu, 2 cores"}
    (folder / "metrics.json").write_text(json.dumps({"run": run, "rounds": rounds}))


def test_p2_report_gives_final_last5_and_best_over_seeds(tmp_path: Path) -> None:
    from tools.evidence import p2_report

    clients = {"0": {"personal_acc": 0.5}, "1": {"personal_acc": 0.7}}
    _finished(tmp_path / "fml", [0.1, 0.2, 0.6, 0.5, 0.5, 0.5], 0.3, clients)
    _finished(tmp_path / "fml-seed43", [0.1, 0.2, 0.4, 0.7, 0.7, 0.7], 0.5, clients)
    _finished(tmp_path / "local", [0.3] * 6, 0.0, clients)
    (tmp_path / "ditto").mkdir()  # unfinished: no files
    text = p2_report(tmp_path).read_text()
    # final 0.5 and 0.7; last 5 means 0.46 and 0.54; best 0.6 (round 3) and 0.7 (round 4)
    assert (
        "| fml | 42, 43 | 60.00 ± 14.14 | 50.00 ± 5.66 | 65.00 ± 7.07 (best; rounds 3, 4)" in text
    )
    one_seed = "30.00 (1 seed)"
    assert f"| local | 42 | {one_seed} | {one_seed} | {one_seed} (best; round 1) |" in text
    assert "| fml | 50.0 | 70.0 |" in text  # every client's final, mean over seeds
    assert "Not finished (left out): ditto." in text
    assert "commit abcdef0" in text
    assert (tmp_path / "accuracy.png").is_file()


def test_p5_report_maps_fml_against_the_best_other_method(tmp_path: Path) -> None:
    from tools.evidence import p5_report

    values = {"fml": (0.6, 0.30), "local": (0.5, 0.0), "ditto": (0.65, 0.31), "fedavg": (0.4, 0.25)}
    for method, (acc, central) in values.items():
        _finished(tmp_path / f"a0.5-n100-{method}", [acc], central, {})
        _finished(tmp_path / f"a0.1-n100-{method}", [acc + 0.1 * (method == "fml")], central, {})
    text = p5_report(tmp_path).read_text()
    assert "| 0.5 | -5.00 |" in text  # FML 60 vs Ditto 65
    assert "| 0.1 | +5.00 |" in text  # FML 70 vs Ditto 65
    assert "| 0.5 | +5.00 |" in text.split("FedAvg's (central")[1]  # 30 vs 25 central
    assert (tmp_path / "heatmaps.png").is_file()
    assert text.count("also runs at seeds 43 and 44") == 1  # the sign changes: named once
    assert "alpha 0.1 n = 100, alpha 0.5 n = 100" in text


def test_p5_names_the_cells_that_need_seeds_43_and_44_and_adds_their_runs(
    tmp_path: Path,
) -> None:
    """Within 1 point, or the sign changing towards a neighbouring cell: seeds 43, 44."""
    import yaml

    from tools.evidence import add_seed_runs, cells_for_more_seeds

    diff = {
        (0.1, 100): 0.05,  # +5 points, but the next n turns negative: both cells
        (0.1, 300): -0.02,
        (0.5, 100): 0.04,  # +4, its neighbours positive or missing: not needed
        (1.0, 1000): 0.005,  # within 1 point
        (5.0, 3000): -0.03,  # -3, no neighbour with a value
    }
    assert cells_for_more_seeds(diff) == [(0.1, 100), (0.1, 300), (1.0, 1000)]
    sweep = tmp_path / "p5.yaml"
    listed = "  - {name: a0.1-n100-fml-seed43, experiment: p4, overrides: {seed: 43}}\n"
    sweep.write_text("supernodes: 10\nruns:\n" + listed)
    added = add_seed_runs([(0.1, 100), (1.0, 1000)], sweep)
    assert len(added) == 15 and "a0.1-n100-fml-seed43" not in added  # 2 cells x 2 seeds x 4 - 1
    runs = yaml.safe_load(sweep.read_text())["runs"]
    assert runs[-1] == {
        "name": "a1.0-n1000-fedavg-seed44",
        "experiment": "p4",
        "overrides": {
            "train.method": "fedavg",
            "data.dirichlet_alpha": 1.0,
            "data.max_train_examples": 1000,
            "seed": 44,
        },
    }
    assert add_seed_runs([(0.1, 100), (1.0, 1000)], sweep) == []  # idempotent


def test_collect_copies_finished_runs_without_checkpoints(tmp_path: Path) -> None:
    from tools.experiments import collect

    clone, main = tmp_path / "clone" / "demo", tmp_path / "main" / "demo"
    _run(clone / "done", {}, [{0: 0.5, 1: 0.7}])
    (clone / "done" / "checkpoint.ckpt").write_bytes(b"x" * 100)
    _run(clone / "cut", {}, [{0: 0.5}])
    cut = json.loads((clone / "cut" / "metrics.json").read_text())
    del cut["run"]["finished"]  # running, or cut at a session's end
    (clone / "cut" / "metrics.json").write_text(json.dumps(cut))
    _run(clone / "have", {}, [{0: 0.1}])
    _run(main / "have", {}, [{0: 0.9}])  # already collected: left alone
    (clone / ".state" / "done").mkdir(parents=True)
    runs = [RunSpec(n, "base") for n in ("done", "cut", "have", "absent")]

    assert collect("demo", clone.parent, main.parent, runs) == ["done"]
    assert sorted(p.name for p in (main / "done").iterdir()) == ["config.yaml", "metrics.json"]
    assert not (main / "cut").exists() and not (main / ".state").exists()
    assert "0.9" in (main / "have" / "metrics.json").read_text()
    assert collect("demo", clone.parent, main.parent, runs) == []  # nothing new

    # a half-written folder here is never overwritten, and the error names it
    (main / "done" / "metrics.json").write_text("{")
    with pytest.raises(FileExistsError, match=r"main/demo/done"):
        collect("demo", clone.parent, main.parent, runs)
    with pytest.raises(ValueError, match="own sweep folder"):
        collect("demo", main.parent, main.parent, runs)
