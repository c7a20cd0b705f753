"""The one typed configuration schema, its YAML files in ``conf/`` and its validation.

Precedence, lowest first: the schema's defaults, ``conf/base.yaml``, the experiment file
``conf/<experiment>.yaml``, then overrides (Flower's run-config keys such as
``train.alpha``). Everything is validated before any training starts; an invalid value
raises :class:`ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fml_flower.models import is_known_model
from fml_flower.settings import DISTILLATIONS
from fml_flower.training import MEMORY_FORMATS, PRECISIONS


def _conf_dir() -> Path:
    """``conf/`` of the source tree or app bundle, else the copy installed in the wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "base.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no conf/base.yaml next to {here}: the installation is incomplete")


CONF_DIR = _conf_dir()

SOURCES = ("embedded", "local", "huggingface")
EMBEDDED_DATASETS = ("mnist5k",)
PARTITIONERS = ("iid", "pathological", "shard", "dirichlet")
LAST_BATCH = ("auto", "keep", "drop", "merge")
UPDATES = ("simultaneous", "sequential")
PRIVACY_MODES = ("none", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive")
AGGREGATION_RULES = ("mean", "trimmed-mean", "median", "krum", "multikrum")
ATTACKS = ("none", "scale", "random")


OVERRIDES_KEY = "overrides"
"""Run-config key holding explicit overrides (see :func:`parse_explicit_overrides`)."""

SENT_CONFIG_KEY = "fml.config"
"""Key, in the ConfigRecord of every message the project's ServerApp sends, of the run's
resolved configuration (YAML as UTF-8 bytes, :func:`to_yaml`; bytes, so that Flower's
log shows ``<bytes>`` instead of the whole text): the clients use it rather than derive their
own from the run-config (a resumed run's configuration exists only in the server's run
folder). See :func:`config_from_yaml`."""


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key."""


@dataclass
class DataConfig:
    """Where the data comes from and how it is split over clients."""

    source: str = "embedded"
    """``embedded`` (a dataset shipped in a Python package, no network), ``local`` (a
    folder of ``.npz``/parquet files) or ``huggingface`` (a hub name via flwr-datasets)."""
    name: str = "mnist5k"
    """embedded: ``mnist5k``; local: the dataset's folder under ``root`` (e.g. ``mnist``);
    huggingface: the hub id (e.g. ``ylecun/mnist``) or a builder such as ``parquet``."""
    root: str = ""
    """local: the folder holding ``<name>/``; relative paths resolve against the
    working directory, or set it absolute (``${oc.env:FML_DATA_ROOT}`` works)."""
    data_files: dict[str, str] = field(default_factory=dict)
    """huggingface: split name -> file(s), for builders such as ``parquet``."""
    image_key: str = "image"
    label_key: str = "label"
    train_split: str = "train"
    test_split: str = "test"
    partitioner: str = "pathological"
    classes_per_client: int = 2
    """pathological: number of classes each client holds (flwr-datasets'
    ``PathologicalPartitioner``, ``first-deterministic``: client i gets class i mod C plus
    random others, so with few clients some classes may reach nobody; the coverage check
    refuses such a split)."""
    shards_per_client: int = 2
    """shard: McMahan et al.'s shards (``ShardPartitioner``): the training split sorted by
    label, cut into ``clients x shards_per_client`` shards, each client gets that many
    random shards; every example is used."""
    dirichlet_alpha: float = 0.5
    min_partition_size: int = 10
    """dirichlet: resample until every client has at least this many examples."""
    test_fraction: float = 0.2
    """Part of every client's partition kept as that client's own test split."""
    max_train_examples: int = 0
    """Cap on every client's own train part (0 = no cap): the first examples of the shuffled
    split are kept, the client's test part and the central test set are unchanged. For runs
    cut to fit a CPU; results made with a cap must say so."""
    seed: int = 42
    allow_missing_classes: bool = False
    """Before training, the server checks that the clients' train parts together hold every
    class of the dataset and stops, naming the missing classes, when they do not. Set true
    only for a split that leaves classes out on purpose."""
    mean: list[float] = field(default_factory=list)
    """Per-channel normalization; empty = computed from the pooled training split."""
    std: list[float] = field(default_factory=list)
    name_per_client: dict[int, str] = field(default_factory=dict)
    """Partition id -> dataset name (same source and root), overriding ``name`` for those
    clients: a federation of different tasks (e.g. MNIST and Fashion-MNIST clients). The
    clients of one dataset share its training split among themselves; the central test
    set is ``name``'s."""


def data_for_client(
    data: DataConfig, partition_id: int, num_partitions: int
) -> tuple[DataConfig, int, int]:
    """The data setting of one client: ``(its dataset's config, its partition id within
    that dataset, the number of clients sharing that dataset)``.

    Without ``name_per_client`` this is ``(data, partition_id, num_partitions)``. With it,
    the clients holding the same dataset, in partition-id order, split its training set.
    """
    if not data.name_per_client:
        return data, partition_id, num_partitions

    def name_of(pid: int) -> str:
        return data.name_per_client.get(pid, data.name)

    mine = name_of(partition_id)
    group = [pid for pid in range(num_partitions) if name_of(pid) == mine]
    if partition_id not in group:
        raise ConfigError(f"partition id {partition_id} is outside the {num_partitions} partitions")
    return replace(data, name=mine, name_per_client={}), group.index(partition_id), len(group)


@dataclass
class ModelConfig:
    """Architectures: one shared meme model, a private local model per client."""

    meme: str = "cnn"
    local: str = "cnn"
    local_per_client: dict[int, str] = field(default_factory=dict)
    """Partition id -> local architecture, overriding ``local`` for those clients."""
    private_patterns: list[str] = field(default_factory=list)
    """FML: regular expressions of meme state-dict keys that stay on each client (a
    task-specific head, as in the journal version's objective heterogeneity); only the rest
    of the meme is averaged. Empty = the whole meme is shared."""


@dataclass
class TrainConfig:
    """Client-side training."""

    method: str = "fml"
    """``fml``, or a baseline under the same data, models and evaluation: ``fedavg``,
    ``fedprox``, ``local`` (no communication), ``ditto``, ``fedper``."""
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_decay_every: int = 0
    """Multiply the learning rate by ``lr_decay_gamma`` every this many rounds; 0 = never."""
    lr_decay_gamma: float = 0.1
    alpha: float = 0.5
    """Weight of the labels in the local model's loss (1 - alpha on the meme's predictions)."""
    beta: float = 0.5
    """Weight of the labels in the meme's loss (1 - beta on the local model's predictions)."""
    alpha_schedule: list[float] = field(default_factory=list)
    """Optional alpha per learning-rate stage (stage k = rounds after k decays)."""
    beta_schedule: list[float] = field(default_factory=list)
    """Optional beta per learning-rate stage, e.g. [0.1, 0.5, 0.9]."""
    last_batch: str = "auto"
    """What an epoch does with its last, incomplete batch: ``auto`` (``keep``, except with
    ``distillation: pfllib``, which drops it as PFLlib does), ``keep`` (a step on the
    remainder, however small), ``drop`` (no step on it; those examples are seen in other
    epochs, the order being reshuffled) or ``merge`` (into the previous batch, one step on
    up to ``2 x batch_size - 1`` examples). A client with fewer examples than one batch
    always takes one step on all of them."""
    update: str = "simultaneous"
    """FML: ``simultaneous`` (both models step on the same batch) or ``sequential`` (DML)."""
    distillation: str = "faithful"
    """FML's loss: ``faithful`` (the paper and the authors' code: KL with ``batchmean``, the
    partner detached) or ``pfllib`` (PFLlib's ``clientFML``: KL averaged over classes too,
    the partner not detached, gradient norms clipped at 10, the last incomplete batch
    dropped, memes averaged uniformly). See ``fml_flower.training.DISTILLATIONS``."""
    precision: str = "fp32"
    """``fp32``, or ``bf16``: forward passes (training and evaluation) under bfloat16
    autocast on CPU or CUDA; weights, optimizer state, losses and metrics stay fp32. On a
    CPU without native bf16 (AVX-512 BF16/AMX) bf16 is emulated and much slower (a
    warning says so). bf16 numbers count where a parity run says so (BENCHMARKS.md)."""
    memory_format: str = "auto"
    """Convolution weights and inputs: ``contiguous``, ``channels_last`` or ``auto``
    (channels-last for bf16 on a CPU, where it was measured faster for every CNN;
    contiguous otherwise). ``python -m tools.bench precision`` measures your machine."""
    proximal_mu: float = 0.01
    """FedProx: weight of the proximal term."""
    ditto_lambda: float = 0.1
    """Ditto: weight of the personal model's pull towards the global model."""
    device: str = "auto"
    """``auto`` (``cuda`` if torch sees a GPU, else ``cpu``), ``cpu`` or ``cuda[:i]``."""
    torch_threads: int = 0
    """torch.set_num_threads in each ClientApp process; 0 = leave torch's default."""


@dataclass
class FederationConfig:
    """Server-side federation settings."""

    num_rounds: int = 10
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    evaluation: str = "in-train"
    """``in-train``: one message per round: clients score what they hold from the last
    round (the received global model, their personalized model) before they train and send
    it with the training reply; it is booked as that round's evaluation, and only the last
    round gets an evaluation message. ``separate``: an evaluation message every round,
    right after aggregation (Flower's default)."""
    evaluate_every: int = 1
    """Evaluate (clients and central test set) the models of every this-many-th round and
    of the last round; the other rounds only train (training is the same either way). For
    protocols that report the final round only."""
    min_nodes: int = 2
    """Wait for at least this many nodes; also the minimum sampled per round."""
    round_timeout: float = 3600.0
    """Seconds to wait for the replies of a round; late nodes count as missing."""
    node_wait: float = 300.0
    """Seconds a round waits for ``min_nodes`` connected nodes (a node that died and was
    not restarted); after that the run stops with an error naming how many it waited for."""
    poll_interval: float = 0.1
    """Seconds between the server's checks for replies (Flower 1.42's own grid waits 3 s;
    see ``server_app/grid.py``)."""
    min_replies: int = 1
    """Fewest valid training replies to update the global model; below it, the round keeps
    the previous global model (and says so in the results)."""
    resume_from: str = ""
    """A previous run folder: continue from its last checkpointed round."""
    state_dir: str = ""
    """Where clients keep their personalized state (one checkpoint file per client,
    ``personal-p<partition-id>.ckpt``) when a node's config names no ``state-dir``: in
    simulation, every node. Durable: a later run with the same method and split, or a
    run resumed with ``resume_from``, continues the personalized models found there.
    Empty: a folder for this run under the system's temporary directory, removed when the
    run ends."""
    join_round: dict[int, int] = field(default_factory=dict)
    """Partition id -> the round in which that client joins the federation (new
    participants). Before it, the client is neither trained nor evaluated; from it on, it
    may be sampled like any other (its meme then starts from the current global model, its
    personalized model is new). Clients not listed take part from round 1. Before round 1
    the server asks every node for its partition id (one ``query`` message), so the nodes
    of listed partitions must be connected at the start; nodes that connect later are
    asked when they appear. ``federation.min_replies`` counts joined clients only."""


@dataclass
class PrivacyConfig:
    """Differential privacy of what leaves a client (the meme, or a baseline's model),
    through Flower's DP strategy wrappers and client mods; see ``docs/privacy.md``.
    """

    mode: str = "none"
    """``none``; ``server-fixed`` / ``client-fixed`` (fixed clipping on the server or, by
    Flower's ``fixedclipping_mod``, on the clients); ``server-adaptive`` /
    ``client-adaptive`` (adaptive clipping, Andrew et al. 2021)."""
    noise_multiplier: float = 1.0
    """Gaussian noise std on the average, in units of ``clipping_norm / clients per
    round``. 0 clips without noise (no guarantee; epsilon is not finite)."""
    clipping_norm: float = 1.0
    """L2 bound of one client's update (its meme minus the global model); the initial
    bound for the adaptive modes."""
    delta: float = 1e-5
    """The delta at which epsilon is reported (below 1 / number of clients)."""
    max_epsilon: float = 0.0
    """Privacy budget: the run stops cleanly before a round whose release would spend
    more (0 = no budget)."""
    target_quantile: float = 0.5
    """Adaptive modes: the fraction of updates the clipping norm aims to leave unclipped."""
    clip_norm_lr: float = 0.2
    """Adaptive modes: the learning rate of the geometric clipping-norm update."""
    clipped_count_stddev: float = 0.0
    """Adaptive modes: noise std of the clipped-updates count (0 = Flower's default,
    clients per round / 20)."""


@dataclass
class AggregationConfig:
    """How the server combines the clients' memes (or models)."""

    rule: str = "mean"
    """``mean`` (FedAvg), or one of Flower's robust aggregators applied per array:
    ``trimmed-mean``, ``median``, ``krum``, ``multikrum``."""
    trim_fraction: float = 0.1
    """``trimmed-mean``: fraction cut at each end (Flower's ``FedTrimmedAvg(beta=)``)."""
    num_malicious: int = 1
    """``krum``/``multikrum``: clients assumed malicious (f)."""
    num_selected: int = 0
    """``multikrum``: updates averaged after selection (0 = clients - num_malicious)."""
    weighting: str = "auto"
    """``examples`` (weights = training examples, FedAvg), ``uniform``, or ``auto``:
    uniform with differential privacy (its noise is calibrated to equal weights), examples
    without."""


@dataclass
class AttackConfig:
    """A poisoning experiment: what the listed clients send instead of their update."""

    clients: list[int] = field(default_factory=list)
    """Partition ids of the attacking clients (empty = no attack)."""
    kind: str = "none"
    """``scale``: the update (sent minus received) times ``scale``; ``random``: every
    array replaced by Gaussian noise of that array's own standard deviation."""
    scale: float = -10.0


@dataclass
class OutputConfig:
    """Where results go."""

    dir: str = "outputs"
    """Parent folder of run folders; relative paths resolve against the working directory."""
    run_name: str = ""
    """Run folder name; empty = ``<date>-<time>-<experiment>``."""
    plot: bool = True
    tensorboard: bool = False
    """Also write every round's scalars as TensorBoard events to ``<run>/tensorboard``
    (needs the ``tensorboard`` extra: ``pip install -e '.[tensorboard]'``)."""


@dataclass
class FMLConfig:
    """The whole configuration of one run."""

    experiment: str = "base"
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def _schema_leaves(node: DictConfig, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in node:
        value = node[key]
        name = f"{prefix}{key}"
        if isinstance(value, DictConfig) and OmegaConf.get_type(value) is not dict:
            out.update(_schema_leaves(value, name + "."))
        else:
            out[name] = value
    return out


def config_keys() -> list[str]:
    """Every leaf key of the schema in dotted form (``train.alpha``, ...)."""
    return list(_schema_leaves(OmegaConf.structured(FMLConfig)))


def experiment_names(conf_dir: Path = CONF_DIR) -> list[str]:
    """Experiments available as ``conf/<name>.yaml``."""
    return sorted(p.stem for p in conf_dir.glob("*.yaml"))


def _load_yaml(path: Path) -> DictConfig:
    try:
        node = OmegaConf.load(path)
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return node


def load_config(
    experiment: str = "base",
    overrides: Mapping[str, Any] | None = None,
    conf_dir: Path = CONF_DIR,
) -> FMLConfig:
    """Build and validate the configuration of one run.

    Parameters
    ----------
    experiment : str
        Name of an experiment file ``conf/<experiment>.yaml`` merged over ``base.yaml``.
    overrides : Mapping[str, Any], optional
        Dotted keys (``train.alpha``) and values applied last.
    conf_dir : Path
        Folder holding ``base.yaml`` and the experiment files.

    Raises
    ------
    ConfigError
        Unknown experiment or key, a value of the wrong type, or a value out of range.
    """
    schema = OmegaConf.structured(FMLConfig)
    names = experiment_names(conf_dir)
    if experiment not in names:
        raise ConfigError(f"experiment: no file conf/{experiment}.yaml; available: {names}")
    layers = [_load_yaml(conf_dir / "base.yaml")]
    if experiment != "base":
        layers.append(_load_yaml(conf_dir / f"{experiment}.yaml"))
    dotlist = parse_overrides(overrides or {}, schema)
    try:
        merged = OmegaConf.merge(schema, *layers, dotlist)
        merged.experiment = experiment
        cfg: FMLConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError(f"{key}: {err.msg if hasattr(err, 'msg') else err}") from err
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config: {err}") from err
    validate(cfg)
    return cfg


def parse_overrides(overrides: Mapping[str, Any], schema: DictConfig | None = None) -> DictConfig:
    """Dotted overrides (``{"train.alpha": 0.3, "train.beta_schedule": "[0.1, 0.9]"}``) as
    a config, parsed by omegaconf's own dotlist grammar (so lists and mappings may be given
    as YAML text) and checked key by key against the schema.
    """
    schema = schema if schema is not None else OmegaConf.structured(FMLConfig)
    known = config_keys()
    out = OmegaConf.create()
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError(f"{key}: unknown configuration key; known keys: {known}")
        text = value if isinstance(value, str) else _toml_scalar(value)
        try:
            node = OmegaConf.from_dotlist([f"{key}={text}"])
            OmegaConf.merge(schema, node)
        except (OmegaConfBaseException, TypeError, ValueError) as err:
            raise ConfigError(f"{key}: cannot use {value!r} ({err})") from err
        out = OmegaConf.merge(out, node)
    return out  # type: ignore[return-value]


def _toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def check_partition_ids(cfg: FMLConfig, num_partitions: int) -> None:
    """Refuse keys that name clients the federation does not have (partition ids must be
    below ``num_partitions``): ``model.local_per_client``, ``federation.join_round``,
    ``attack.clients`` (``data.name_per_client`` is checked with the datasets); and
    settings that need more clients than there are.
    """
    named = {
        "model.local_per_client": cfg.model.local_per_client,
        "federation.join_round": cfg.federation.join_round,
        "attack.clients": dict.fromkeys(cfg.attack.clients),
    }
    for key, mapping in named.items():
        late = sorted(pid for pid in mapping if not 0 <= pid < num_partitions)
        if late:
            raise ConfigError(
                f"{key}: partition ids {late} do not exist: the federation has "
                f"{num_partitions} clients (partition ids 0-{num_partitions - 1})"
            )
    a = cfg.aggregation
    if a.rule == "trimmed-mean" and int(a.trim_fraction * num_partitions) == 0:
        raise ConfigError(
            f"aggregation.trim_fraction={a.trim_fraction} cuts nothing from "
            f"{num_partitions} clients (int({a.trim_fraction} * {num_partitions}) = 0): "
            "raise it to at least 1 / clients per round"
        )
    if a.rule in ("krum", "multikrum") and num_partitions <= 2 * a.num_malicious + 2:
        raise ConfigError(
            f"aggregation.rule={a.rule} needs more than 2 * num_malicious + 2 = "
            f"{2 * a.num_malicious + 2} clients, the federation has {num_partitions}"
        )
    if a.rule == "multikrum" and a.num_selected > num_partitions - a.num_malicious:
        raise ConfigError(
            f"aggregation.num_selected={a.num_selected} exceeds clients - num_malicious = "
            f"{num_partitions - a.num_malicious}"
        )
    p = cfg.privacy
    if p.mode != "none" and not p.delta < 1 / num_partitions:
        raise ConfigError(
            f"privacy.delta={p.delta:g} must be below 1 / clients = {1 / num_partitions:g}"
        )


def run_config_defaults() -> dict[str, Any]:
    """The run-config that mirrors ``conf/base.yaml`` in ``pyproject.toml``: every schema
    key with its base value (lists and mappings as YAML text). A test keeps the two equal.
    """
    base = OmegaConf.merge(OmegaConf.structured(FMLConfig), _load_yaml(CONF_DIR / "base.yaml"))
    out: dict[str, Any] = {}
    for key, value in _schema_leaves(base).items():
        if key == "experiment":
            continue
        out[key] = _as_run_config(value)
    return out


def config_from_run_config(run_config: Mapping[str, Any]) -> FMLConfig:
    """Configuration from Flower's run-config.

    ``experiment`` picks the YAML file laid over ``conf/base.yaml``. Every other key is a
    dotted override. ``pyproject.toml`` lists every key with its ``conf/base.yaml`` value
    (Flower shows and merges run-config defaults from there); a value equal to that
    default is what Flower passes when the user did not set the key, so it does not
    override the experiment file: only values that differ from ``base.yaml`` do. An
    empty string also means "not set here".
    """
    experiment = str(run_config.get("experiment", "base") or "base")
    explicit = parse_explicit_overrides(run_config.get(OVERRIDES_KEY, "{}"))
    defaults = run_config_defaults()
    overrides = {
        k: v
        for k, v in run_config.items()
        if k not in ("experiment", OVERRIDES_KEY)
        and v != ""
        and not (k in defaults and _same(defaults[k], v))
    }
    given = {**overrides, **explicit}
    resume_from = given.get("federation.resume_from")
    if resume_from not in (None, ""):
        if "experiment" in run_config and not _same("base", run_config["experiment"]):
            given["experiment"] = experiment
        return resumed_config(str(resume_from), given)
    cfg = load_config(experiment, given)
    if experiment != "base":  # say where a base value cannot win over the experiment file
        leaves = _schema_leaves(OmegaConf.structured(cfg))
        for key, value in run_config.items():
            if key in defaults and key not in overrides and key not in explicit and value != "":
                used = leaves.get(key)
                if used is not None and not _same(defaults[key], _as_run_config(used)):
                    logging.getLogger("flwr").warning(
                        "run-config %s=%r equals conf/base.yaml's value, which is also what "
                        "Flower passes when the key is not set, so conf/%s.yaml's %r is used; "
                        "to set it anyway, pass %s='{%s: %s}'",
                        key,
                        value,
                        experiment,
                        _as_run_config(used),
                        OVERRIDES_KEY,
                        key,
                        json.dumps(value),
                    )
    return cfg


RESUME_MAY_CHANGE = (
    "federation.",
    "output.",
    "train.device",
    "train.torch_threads",
    "train.precision",
    "train.memory_format",
)
"""Keys a resumed run may set anew (where and how it runs); any other would change the
experiment (method, data, models, training, privacy, aggregation, seed)."""


def _leaves(cfg: FMLConfig) -> dict[str, Any]:
    return _schema_leaves(OmegaConf.structured(cfg))  # type: ignore[arg-type]


def resumed_config(folder: str, given: Mapping[str, Any]) -> FMLConfig:
    """The configuration of a run resumed from ``folder`` (``federation.resume_from``):
    the one recorded in ``<folder>/config.yaml``, with the keys of ``given`` that differ
    from it laid over (only keys of :data:`RESUME_MAY_CHANGE`; another would change the
    experiment and is refused by name). The run gets a folder of its own
    (``output.run_name`` is not reused unless given). Logs which keys were overridden.
    """
    path = Path(folder).expanduser() / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            f"federation.resume_from: no config.yaml in {Path(folder).expanduser().resolve()} "
            "(name the folder of the run to continue)"
        )
    recorded = _load_yaml(path)
    try:
        saved: FMLConfig = OmegaConf.to_object(  # type: ignore[assignment]
            OmegaConf.merge(OmegaConf.structured(FMLConfig), recorded)
        )
    except OmegaConfBaseException as err:
        raise ConfigError(f"federation.resume_from: {path} does not fit the schema: {err}") from err
    before = _leaves(saved)
    wanted = dict(given)
    experiment = wanted.pop("experiment", saved.experiment)
    if experiment != saved.experiment:
        raise ConfigError(
            f"federation.resume_from: experiment={experiment!r} but the run in {folder} is "
            f"{saved.experiment!r}; a resumed run continues its own experiment"
        )
    parsed = _leaves(_with_overrides(saved, {k: v for k, v in wanted.items()}))
    changed = {
        k: parsed[k]
        for k in wanted
        if k != "federation.resume_from" and not _same_value(before.get(k), parsed.get(k))
    }
    refused = sorted(k for k in changed if not k.startswith(RESUME_MAY_CHANGE))
    if refused:
        detail = "; ".join(f"{k}={changed[k]!r} (the run has {before.get(k)!r})" for k in refused)
        allowed = ", ".join(k + "*" if k.endswith(".") else k for k in RESUME_MAY_CHANGE)
        raise ConfigError(
            f"federation.resume_from: {detail}: would change the experiment of {folder}. A "
            f"resumed run takes its configuration from {path.name}; it may only set {allowed}"
        )
    values = dict(changed)
    values.setdefault("output.run_name", "")  # a folder of its own, unless given
    values["federation.resume_from"] = folder
    cfg = _with_values(saved, values)
    validate(cfg)
    logging.getLogger("flwr").info(
        "Resuming %s with its recorded configuration (%s)%s",
        folder,
        path,
        "; overridden: " + ", ".join(f"{k}={v!r}" for k, v in changed.items()) if changed else "",
    )
    return cfg


def _with_values(cfg: FMLConfig, values: Mapping[str, Any]) -> FMLConfig:
    """``cfg`` with dotted keys set to already parsed ``values``."""
    node = OmegaConf.structured(cfg)
    try:
        for key, value in values.items():
            OmegaConf.update(node, key, value, merge=False)
        return OmegaConf.to_object(node)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(f"federation.resume_from: {err}") from err


def _with_overrides(cfg: FMLConfig, overrides: Mapping[str, Any]) -> FMLConfig:
    """``cfg`` with dotted ``overrides`` (parsed as run-config values are)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cfg), parse_overrides(overrides))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(f"federation.resume_from: {err}") from err


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, DictConfig | ListConfig):
        a = OmegaConf.to_container(a)
    if isinstance(b, DictConfig | ListConfig):
        b = OmegaConf.to_container(b)
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def parse_explicit_overrides(text: object) -> dict[str, Any]:
    """The run-config key ``overrides``: a YAML mapping of dotted keys to values, applied
    last and always (unlike a plain run-config key, whose base value means "not set").
    """
    try:
        value = yaml.safe_load(str(text)) if str(text).strip() else {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{OVERRIDES_KEY}: not a YAML mapping ({err})") from err
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(
            f"{OVERRIDES_KEY}: must be a mapping of dotted keys to values, e.g. "
            f"'{{federation.num_rounds: 10}}', got {text!r}"
        )
    return value


def _as_run_config(value: Any) -> Any:
    """A config value as the run-config writes it (lists and mappings as YAML text)."""
    if isinstance(value, DictConfig | ListConfig):
        return yaml.safe_dump(OmegaConf.to_container(value), default_flow_style=True).strip()
    if isinstance(value, list | dict):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return value


def _same(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return default is value
    if isinstance(default, int | float) and isinstance(value, int | float):
        return float(default) == float(value)
    return str(default) == str(value)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _check_choice(value: str, key: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, key, f"'{value}' is not one of {list(allowed)}")


def validate(cfg: FMLConfig) -> None:
    """Check every value that the types alone do not; raise :class:`ConfigError`."""
    d, m, t, f = cfg.data, cfg.model, cfg.train, cfg.federation
    _check_choice(d.source, "data.source", SOURCES)
    if d.source == "embedded":
        _check_choice(d.name, "data.name", EMBEDDED_DATASETS)
    if d.source == "local":
        _check(bool(d.root), "data.root", "must name the folder holding the dataset")
        folder = Path(d.root).expanduser() / d.name
        _check(folder.is_dir(), "data.root", f"folder {folder.resolve()} does not exist")
    if d.source == "huggingface":
        _check(bool(d.name), "data.name", "must be a Hugging Face dataset id or builder")
    _check_choice(d.partitioner, "data.partitioner", PARTITIONERS)
    _check(d.classes_per_client >= 1, "data.classes_per_client", "must be >= 1")
    _check(d.shards_per_client >= 1, "data.shards_per_client", "must be >= 1")
    _check(d.dirichlet_alpha > 0, "data.dirichlet_alpha", "must be > 0")
    _check(d.min_partition_size >= 0, "data.min_partition_size", "must be >= 0")
    _check(0 < d.test_fraction < 1, "data.test_fraction", "must be in (0, 1)")
    _check(d.max_train_examples >= 0, "data.max_train_examples", "must be >= 0 (0 = no cap)")
    _check(len(d.mean) == len(d.std), "data.mean", "data.mean and data.std need equal lengths")
    _check(all(pid >= 0 for pid in d.name_per_client), "data.name_per_client", "ids must be >= 0")
    for pid, name in d.name_per_client.items():
        _check(bool(name), f"data.name_per_client.{pid}", "must name a dataset")
        if d.source == "embedded":
            _check_choice(name, f"data.name_per_client.{pid}", EMBEDDED_DATASETS)
        if d.source == "local":
            folder = Path(d.root).expanduser() / name
            _check(
                folder.is_dir(),
                f"data.name_per_client.{pid}",
                f"folder {folder.resolve()} does not exist",
            )
    _check(all(s > 0 for s in d.std), "data.std", "must be > 0")

    for key, name in [("model.meme", m.meme), ("model.local", m.local)] + [
        (f"model.local_per_client.{pid}", n) for pid, n in m.local_per_client.items()
    ]:
        _check(
            is_known_model(name),
            key,
            f"unknown model '{name}' (use mlp, lenet5, cnn, "
            "resnet18 or a torchvision classification model name)",
        )
    _check(
        all(pid >= 0 for pid in m.local_per_client),
        "model.local_per_client",
        "partition ids must be >= 0",
    )

    for pattern in m.private_patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(
                f"model.private_patterns: '{pattern}' is not a regex ({err})"
            ) from err
    from fml_flower.methods import METHODS  # the registry imports this module

    _check_choice(t.method, "train.method", tuple(METHODS))
    _check(
        not m.private_patterns or METHODS[t.method].supports_private_patterns,
        "model.private_patterns",
        f"is not supported by train.method={t.method} (FedPer and FedRep keep their head "
        "private by themselves)",
    )
    _check_choice(t.update, "train.update", UPDATES)
    _check_choice(t.last_batch, "train.last_batch", LAST_BATCH)
    _check_choice(t.precision, "train.precision", PRECISIONS)
    _check_choice(t.memory_format, "train.memory_format", MEMORY_FORMATS)
    _check_choice(t.distillation, "train.distillation", DISTILLATIONS)
    _check(
        t.distillation == "faithful" or t.method == "fml",
        "train.distillation",
        f"'{t.distillation}' is a loss of FML; train.method={t.method} has no distillation",
    )
    _check(
        t.distillation == "faithful" or t.update == "simultaneous",
        "train.distillation",
        f"'{t.distillation}' is PFLlib's simultaneous step; it cannot be used with "
        f"train.update={t.update}",
    )
    _check(t.local_epochs >= 1, "train.local_epochs", "must be >= 1")
    _check(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    _check(t.lr > 0, "train.lr", "must be > 0")
    _check(0 <= t.momentum < 1, "train.momentum", "must be in [0, 1)")
    _check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _check(t.lr_decay_every >= 0, "train.lr_decay_every", "must be >= 0 (0 = no decay)")
    _check(0 < t.lr_decay_gamma <= 1, "train.lr_decay_gamma", "must be in (0, 1]")
    for key, value in [("train.alpha", t.alpha), ("train.beta", t.beta)]:
        _check(0 <= value <= 1, key, f"{value} is outside [0, 1]")
    for key, sched in [
        ("train.alpha_schedule", t.alpha_schedule),
        ("train.beta_schedule", t.beta_schedule),
    ]:
        _check(all(0 <= v <= 1 for v in sched), key, f"{sched} has values outside [0, 1]")
        _check(
            len(sched) <= 1 or t.lr_decay_every > 0,
            key,
            f"{sched} gives one value per learning-rate stage, but train.lr_decay_every=0 "
            "makes a single stage (the schedule would stay at its first value): set "
            "train.lr_decay_every > 0",
        )
        stages = 1 + (f.num_rounds - 1) // t.lr_decay_every if t.lr_decay_every > 0 else 1
        _check(
            len(sched) <= stages,
            key,
            f"{sched} has {len(sched)} values but federation.num_rounds={f.num_rounds} with "
            f"train.lr_decay_every={t.lr_decay_every} has {stages} stage(s)",
        )
    _check(t.proximal_mu >= 0, "train.proximal_mu", "must be >= 0")
    _check(t.ditto_lambda >= 0, "train.ditto_lambda", "must be >= 0")
    _check(
        t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
        "train.device",
        f"'{t.device}' is not one of auto, cpu, cuda, cuda:<i>",
    )
    _check(t.torch_threads >= 0, "train.torch_threads", "must be >= 0 (0 = torch default)")

    _check(f.num_rounds >= 1, "federation.num_rounds", "must be >= 1")
    _check(0 < f.fraction_train <= 1, "federation.fraction_train", "must be in (0, 1]")
    _check(0 <= f.fraction_evaluate <= 1, "federation.fraction_evaluate", "must be in [0, 1]")
    _check_choice(f.evaluation, "federation.evaluation", ("in-train", "separate"))
    _check(f.min_nodes >= 1, "federation.min_nodes", "must be >= 1")
    _check(f.evaluate_every >= 1, "federation.evaluate_every", "must be >= 1")
    _check(f.round_timeout > 0, "federation.round_timeout", "must be > 0")
    _check(f.node_wait > 0, "federation.node_wait", "must be > 0 seconds")
    _check(f.min_replies >= 1, "federation.min_replies", "must be >= 1")
    _check(0 < f.poll_interval <= 60, "federation.poll_interval", "must be in (0, 60] seconds")
    for pid, join in f.join_round.items():
        _check(pid >= 0, "federation.join_round", f"partition id {pid} must be >= 0")
        _check(
            1 <= join <= f.num_rounds,
            f"federation.join_round.{pid}",
            f"round {join} is outside 1..federation.num_rounds={f.num_rounds}",
        )
    validate_privacy(cfg)
    _check(
        not cfg.output.tensorboard or importlib.util.find_spec("tensorboard") is not None,
        "output.tensorboard",
        "needs the tensorboard package: pip install -e '.[tensorboard]'",
    )


def weighting_of(cfg: FMLConfig) -> str:
    """``aggregation.weighting`` resolved: ``examples`` or ``uniform`` (``auto``: uniform
    with differential privacy or PFLlib's distillation, whose server averages memes
    uniformly; examples otherwise).
    """
    if cfg.aggregation.weighting != "auto":
        return cfg.aggregation.weighting
    if cfg.privacy.mode != "none" or cfg.train.distillation == "pfllib":
        return "uniform"
    return "examples"


def validate_privacy(cfg: FMLConfig) -> None:
    """The ``privacy``, ``aggregation`` and ``attack`` sections and their cross-checks."""
    from fml_flower.methods import METHODS

    p, a, atk, t = cfg.privacy, cfg.aggregation, cfg.attack, cfg.train
    _check_choice(p.mode, "privacy.mode", PRIVACY_MODES)
    _check(p.noise_multiplier >= 0, "privacy.noise_multiplier", "must be >= 0")
    _check(p.clipping_norm > 0, "privacy.clipping_norm", "must be > 0")
    _check(0 < p.delta < 1, "privacy.delta", "must be in (0, 1)")
    _check(p.max_epsilon >= 0, "privacy.max_epsilon", "must be >= 0 (0 = no budget)")
    _check(0 <= p.target_quantile <= 1, "privacy.target_quantile", "must be in [0, 1]")
    _check(p.clip_norm_lr > 0, "privacy.clip_norm_lr", "must be > 0")
    _check(p.clipped_count_stddev >= 0, "privacy.clipped_count_stddev", "must be >= 0")
    _check_choice(a.rule, "aggregation.rule", AGGREGATION_RULES)
    _check(0 < a.trim_fraction < 0.5, "aggregation.trim_fraction", "must be in (0, 0.5)")
    _check(a.num_malicious >= 0, "aggregation.num_malicious", "must be >= 0")
    _check(a.num_selected >= 0, "aggregation.num_selected", "must be >= 0 (0 = n - f)")
    _check_choice(a.weighting, "aggregation.weighting", ("auto", "examples", "uniform"))
    _check_choice(atk.kind, "attack.kind", ATTACKS)
    _check(all(pid >= 0 for pid in atk.clients), "attack.clients", "partition ids must be >= 0")
    _check(
        (atk.kind == "none") == (not atk.clients),
        "attack.kind",
        f"'{atk.kind}' with attack.clients={atk.clients}: name the attacking clients and a "
        "kind other than none together (or neither)",
    )
    if p.mode == "none":
        _check(p.max_epsilon == 0, "privacy.max_epsilon", "needs privacy.mode other than none")
        return
    _check(
        METHODS[t.method].sends_model,
        "privacy.mode",
        f"train.method={t.method} sends no model: there is nothing to protect",
    )
    _check(
        a.rule == "mean",
        "aggregation.rule",
        f"'{a.rule}' with privacy.mode={p.mode}: the noise is calibrated to the mean of the "
        "clipped updates; robust rules have another sensitivity",
    )
    _check(
        a.weighting != "examples",
        "aggregation.weighting",
        f"must be uniform (or auto) with privacy.mode={p.mode}: the noise is calibrated to "
        "equal weights, and weighting by examples gives a client with many examples more "
        "influence than the noise covers",
    )
    _check(
        not cfg.federation.join_round,
        "federation.join_round",
        f"cannot be used with privacy.mode={p.mode}: the noise is calibrated to a fixed "
        "number of clients per round, and late joiners change it",
    )
    _check(
        p.max_epsilon == 0 or p.noise_multiplier > 0,
        "privacy.max_epsilon",
        "a budget needs privacy.noise_multiplier > 0 (without noise epsilon is infinite)",
    )


def config_from_yaml(text: str) -> FMLConfig:
    """A configuration written by :func:`to_yaml`, laid over the schema and validated."""
    try:
        node = OmegaConf.create(text)
        cfg: FMLConfig = OmegaConf.to_object(  # type: ignore[assignment]
            OmegaConf.merge(OmegaConf.structured(FMLConfig), node)
        )
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError(f"{SENT_CONFIG_KEY}: not a configuration of this schema: {err}") from err
    validate(cfg)
    return cfg


def to_yaml(cfg: FMLConfig) -> str:
    """The resolved configuration as YAML (what a run folder records)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def read_run_config(path: Path) -> dict[str, Any]:
    """A run folder's recorded configuration (written by :func:`to_yaml`), laid over the
    current schema: a run recorded before a key existed reads that key's default.

    Raises
    ------
    ConfigError
        The file cannot be read, or holds a key or value the current schema does not accept.
    """
    saved = _load_yaml(path)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(FMLConfig), saved)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: does not fit the current schema: {err}") from err
    return OmegaConf.to_container(merged)  # type: ignore[return-value]
