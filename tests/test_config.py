"""The configuration schema: layering, run-config overrides, and clear errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fml_flower.config import (
    ConfigError,
    config_from_run_config,
    config_keys,
    experiment_names,
    load_config,
    run_config_defaults,
)

ROOT = Path(__file__).resolve().parent.parent


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_pyproject_run_config_mirrors_the_schema_with_base_values() -> None:
    """Every schema key can be set from Flower's run-config, and nothing else; its value
    in pyproject.toml is conf/base.yaml's (one source: a change to either fails here).
    """
    with open(ROOT / "pyproject.toml", "rb") as fh:
        run_config = _flatten(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])
    assert set(run_config) == set(config_keys()) | {"overrides"}
    assert run_config.pop("experiment") == "base"
    assert run_config.pop("overrides") == "{}"
    assert run_config == run_config_defaults()
    assert config_from_run_config({"experiment": "base", **run_config}) == load_config("base")


def test_pyproject_has_no_federations_section() -> None:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        assert "federations" not in tomllib.load(fh)["tool"]["flwr"]


def test_every_experiment_file_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("mnist", "cifar10", "fashion_mnist"):  # validation checks the folders exist
        (tmp_path / name).mkdir()
    monkeypatch.setenv("FML_DATA_ROOT", str(tmp_path))
    for name in experiment_names():
        cfg = load_config(name)
        assert cfg.experiment == name
        if cfg.data.source == "local":
            assert cfg.data.root == str(tmp_path)


def test_run_config_defaults_do_not_override_the_experiment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flower passes pyproject's values for keys the user did not set: those must leave
    the experiment file's values alone; a value that differs overrides it.
    """
    (tmp_path / "mnist").mkdir()
    monkeypatch.setenv("FML_DATA_ROOT", str(tmp_path))
    defaults = run_config_defaults()
    cfg = config_from_run_config({"experiment": "p3_mnist", **defaults})
    assert cfg == load_config("p3_mnist")
    assert cfg.train.momentum == 0.9 and cfg.model.meme == "lenet5"  # p3's, not base's
    cfg = config_from_run_config({"experiment": "p3_mnist", **defaults, "train.momentum": 0.5})
    assert cfg.train.momentum == 0.5


def test_run_config_overrides_and_empty_means_unset() -> None:
    cfg = config_from_run_config(
        {
            "experiment": "base",
            "train.alpha": 0.3,
            "model.local": "mlp",
            "train.beta": "",
            "train.lr_decay_every": 4,
            "train.beta_schedule": "[0.1, 0.5, 0.9]",
            "model.local_per_client": "{0: lenet5}",
        }
    )
    assert cfg.train.alpha == 0.3
    assert cfg.train.beta == 0.5  # "" kept the YAML's value
    assert cfg.model.local == "mlp"
    assert cfg.train.beta_schedule == [0.1, 0.5, 0.9]
    assert cfg.model.local_per_client == {0: "lenet5"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.alpha": 1.5}, r"train.alpha: 1.5 is outside \[0, 1\]"),
        ({"train.beta": -0.1}, r"train.beta: -0.1 is outside \[0, 1\]"),
        ({"model.meme": "transformer9000"}, r"model.meme: unknown model 'transformer9000'"),
        ({"model.local_per_client": "{3: nope}"}, r"model.local_per_client.3: unknown model"),
        ({"data.source": "ftp"}, r"data.source: 'ftp' is not one of \['embedded', 'local'"),
        ({"data.partitioner": "kmeans"}, r"data.partitioner: 'kmeans' is not one of"),
        ({"data.name": "cifar100"}, r"data.name: 'cifar100' is not one of \['mnist5k'\]"),
        ({"data.source": "local", "data.root": "/no/such/dir"}, r"data.root: folder .* not exist"),
        ({"data.source": "local"}, r"data.root: must name the folder"),
        ({"train.lr": 0}, r"train.lr: must be > 0"),
        ({"train.update": "alternate"}, r"train.update: 'alternate' is not one of"),
        ({"train.beta_schedule": "[0.1, 2]"}, r"train.beta_schedule: .* outside \[0, 1\]"),
        (
            {"train.beta_schedule": "[0.1, 0.9]"},
            r"train.beta_schedule: \[0.1, 0.9\] gives one value per learning-rate stage, but "
            r"train.lr_decay_every=0",
        ),
        (
            {"train.alpha_schedule": "[0.1, 0.5, 0.9]", "train.lr_decay_every": 5},
            r"train.alpha_schedule: .* has 3 values but federation.num_rounds=10 .* 2 stage",
        ),
        ({"train.last_batch": "pad"}, r"train.last_batch: 'pad' is not one of \['auto', 'keep'"),
        ({"data.partitioner": "shard", "data.shards_per_client": 0}, r"shards_per_client"),
        ({"train.method": "fedper", "model.private_patterns": "[x]"}, r"not supported by"),
        ({"federation.num_rounds": 0}, r"federation.num_rounds: must be >= 1"),
        ({"data.test_fraction": 1.0}, r"data.test_fraction: must be in \(0, 1\)"),
        ({"data.max_train_examples": -1}, r"data.max_train_examples: must be >= 0"),
        ({"train.batch_size": "big"}, r"train.batch_size"),
        ({"train.nonsense": 1}, r"train.nonsense: unknown configuration key"),
    ],
)
def test_invalid_values_name_the_key(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("base", overrides)


def test_unknown_experiment_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match=r"experiment: no file conf/nope.yaml; available"):
        load_config("nope")


def test_experiment_file_with_a_bad_key_is_refused(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text((ROOT / "conf" / "base.yaml").read_text())
    (tmp_path / "broken.yaml").write_text("train:\n  alpah: 0.4\n")
    with pytest.raises(ConfigError, match="alpah"):
        load_config("broken", conf_dir=tmp_path)


def test_dynamic_schedule_follows_the_lr_decay() -> None:
    """What the app's strategy sends per round: lr and beta change together by stage."""
    from fml_flower.methods import get_method
    from fml_flower.models import build_model
    from server_app.strategy import make_strategy

    cfg = load_config(
        "base",
        {
            "train.lr_decay_every": 2,
            "train.lr_decay_gamma": 0.1,
            "train.beta_schedule": "[0.1, 0.5, 0.9]",
        },
    )
    meme = build_model(cfg.model.meme, (1, 28, 28), 10)
    strategy = make_strategy(cfg, get_method("fml"), meme)
    got = [strategy.settings(r) for r in range(1, 8)]
    assert [s.beta for s in got] == [0.1, 0.1, 0.5, 0.5, 0.9, 0.9, 0.9]
    assert [s.lr for s in got] == pytest.approx([0.01, 0.01, 0.001, 0.001, 1e-4, 1e-4, 1e-5])
    assert all(s.alpha == 0.5 for s in got)


def test_every_shipped_experiment_and_sweep_is_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """conf/*.yaml and conf/sweeps/*.yaml load and validate (data folders stubbed)."""
    from fml_flower.config import CONF_DIR
    from tools.experiments import load_sweep

    for name in ("mnist", "fashion_mnist", "cifar10"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("FML_DATA_ROOT", str(tmp_path))
    experiments = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
    assert {"p1", "p2", "p3_mnist", "catfish", "new_participants"} <= set(experiments)
    for name in experiments:
        load_config(name)
    for sweep in sorted(p.stem for p in (CONF_DIR / "sweeps").glob("*.yaml")):
        assert load_sweep(sweep), sweep


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train.beta_schedule", [0.1, 0.5, 0.9]),
        ("model.local_per_client", {0: "lenet5", 3: "resnet18"}),
        ("model.private_patterns", ["^classifier\\.3\\."]),
        ("federation.join_round", {8: 7}),
    ],
)
def test_lists_and_maps_survive_the_run_config(key: str, value: object) -> None:
    """Flower's run-config holds scalars only: sweeps pass lists and maps as YAML text."""
    from tools.launch import run_config_value

    text = run_config_value(value)
    assert isinstance(text, str)
    section, name = key.split(".")
    overrides = {key: text, "train.lr_decay_every": 4}  # a schedule needs stages
    assert getattr(getattr(load_config("base", overrides), section), name) == value


def test_a_base_value_that_cannot_override_the_experiment_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Flower passes pyproject's (= base.yaml's) value for an unset key: such a value cannot
    be told from a user's, so the experiment file wins, and the server says so.
    """
    (tmp_path / "mnist").mkdir()
    monkeypatch.setenv("FML_DATA_ROOT", str(tmp_path))
    from fml_flower.config import run_config_defaults

    run_config = {**run_config_defaults(), "experiment": "p1", "train.alpha": 0.3}
    with caplog.at_level("WARNING", logger="flwr"):
        cfg = config_from_run_config(run_config)
    assert cfg.data.source == "local" and cfg.train.alpha == 0.3  # p1's value, the override
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "data.source='embedded'" in warned and "conf/p1.yaml's 'local' is used" in warned
    assert "train.alpha" not in warned and "seed=" not in warned


def test_explicit_overrides_win_even_with_base_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``overrides`` sets a key to base.yaml's value over an experiment file (p3_mnist has
    R = 50; base has 10), which a plain run-config key cannot; bad text is named.
    """
    (tmp_path / "mnist").mkdir()
    monkeypatch.setenv("FML_DATA_ROOT", str(tmp_path))
    from fml_flower.config import run_config_defaults

    defaults = {**run_config_defaults(), "experiment": "p3_mnist"}
    assert config_from_run_config(defaults).federation.num_rounds == 50
    cfg = config_from_run_config(
        {
            **defaults,
            "overrides": "{federation.num_rounds: 10, train.lr_decay_every: 4, "
            "train.beta_schedule: [0.1, 0.9]}",
        }
    )
    assert cfg.federation.num_rounds == 10 and cfg.train.beta_schedule == [0.1, 0.9]
    for bad in ("[1, 2]", "{a: [1", "{federation.num_rounds: many}"):
        with pytest.raises(ConfigError, match=r"overrides|num_rounds"):
            config_from_run_config({**defaults, "overrides": bad})


def test_keys_naming_clients_that_do_not_exist_are_refused() -> None:
    from fml_flower.config import check_partition_ids

    cfg = load_config("base", {"model.local_per_client": "{5: mlp}"})
    check_partition_ids(cfg, 10)
    with pytest.raises(
        ConfigError, match=r"model\.local_per_client: partition ids \[5\] .* 2 clients"
    ):
        check_partition_ids(cfg, 2)
    late = load_config("base", {"federation.join_round": "{3: 2}"})
    with pytest.raises(ConfigError, match=r"federation\.join_round: partition ids \[3\]"):
        check_partition_ids(late, 3)


def test_distillation_and_precision_keys_are_checked() -> None:
    from fml_flower.config import weighting_of

    cfg = load_config("base", {"train.distillation": "pfllib"})
    assert weighting_of(cfg) == "uniform"  # PFLlib's server averages memes uniformly
    assert weighting_of(load_config("base")) == "examples"
    with pytest.raises(ConfigError, match=r"train.distillation: 'pfllib' is a loss of FML"):
        load_config("base", {"train.distillation": "pfllib", "train.method": "fedavg"})
    with pytest.raises(ConfigError, match=r"train.distillation: .* train.update=sequential"):
        load_config("base", {"train.distillation": "pfllib", "train.update": "sequential"})
    with pytest.raises(ConfigError, match=r"train.precision: 'fp16' is not one of"):
        load_config("base", {"train.precision": "fp16"})
    with pytest.raises(ConfigError, match=r"train.memory_format: 'nhwc' is not one of"):
        load_config("base", {"train.memory_format": "nhwc"})
