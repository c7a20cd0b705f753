"""The ClientApp: a thin adapter from Flower messages to the configured method.

Each message: the run's configuration (with this node's overrides), this client's data
(one cache, :class:`ClientDataCache`), its store (``context.state``, restored from the
node's ``state-dir`` when empty), then the method's ``train`` or ``evaluate``
(:mod:`fml_flower.methods`) and a reply holding what the method sends.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.errors import naming_partition
from client_app.fml import used_settings
from client_app.mods import attack_mod, privacy_mod, run_config_of
from client_app.state import NodeStore
from fml_flower.config import (
    ConfigError,
    DataConfig,
    FMLConfig,
    data_for_client,
    to_yaml,
    validate,
)
from fml_flower.methods import ClientRound, Method, get_method
from fml_flower.models import build_model, resolve_device
from fml_flower.personal import run_scratch_dir, run_state_dir
from fml_flower.settings import RoundSettings
from fml_flower.tensors import (
    ClientData,
    DatasetInfo,
    load_partition,
    partition_cache_file,
    partition_fingerprint,
    save_partition,
)
from strategies.robust import EVAL_PREFIX, EVALUATE_BEFORE_TRAIN

if TYPE_CHECKING:
    from fml_flower.data import FederatedImageData

app = ClientApp()


def client_config(context: Context, msg: Message | None = None) -> FMLConfig:
    """The run's validated configuration (the one the server sent with ``msg``, else the
    run-config's) with this node's overrides.
    """
    cfg = run_config_of(context, msg)
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    return node_overrides(cfg, context)


def partition_of(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node's configuration."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as err:
        raise KeyError(
            f"node config lacks {err}; start the SuperNode with --node-config "
            '"partition-id=<i> num-partitions=<n>"'
        ) from err


def node_overrides(cfg: FMLConfig, context: Context) -> FMLConfig:
    """Apply the node config's ``data-root`` (this node's own data folder),
    ``data-name`` (this node's own dataset: a task of its own) and ``local-model`` (this
    node's private architecture, never sent anywhere), if given.
    """
    root = context.node_config.get("data-root")
    arch = context.node_config.get("local-model")
    name = context.node_config.get("data-name")
    if root not in (None, ""):
        cfg = replace(cfg, data=replace(cfg.data, source="local", root=str(root)))
    if name not in (None, ""):
        cfg = replace(cfg, data=replace(cfg.data, name=str(name), name_per_client={}))
    if arch not in (None, ""):
        cfg = replace(cfg, model=replace(cfg.model, local=str(arch), local_per_client={}))
    if (root, arch, name) != (None, None, None):
        try:
            validate(cfg)
        except ConfigError as err:
            raise ConfigError(f"node config {dict(context.node_config)}: {err}") from err
    return cfg


def state_dir_of(context: Context) -> Path | None:
    """The node-local folder for durable personal state (node config ``state-dir``)."""
    value = context.node_config.get("state-dir")
    return Path(str(value)).expanduser() if value not in (None, "") else None


def store_folder(cfg: FMLConfig, context: Context) -> Path:
    """Where this node keeps its personalized state: the node config's ``state-dir``, else
    ``federation.state_dir``, else this run's scratch folder (:func:`run_scratch_dir`).
    """
    node_dir = state_dir_of(context)
    if node_dir is not None:
        return node_dir
    return run_state_dir(cfg.federation.state_dir, context.run_id)


class ClientDataCache:
    """The client side's one cache: a client's ready train/test tensors on its device.

    In memory per process and, with a cache folder, on disk. A simulation worker serves
    many clients of one run: without a cache folder it keeps every client's tensors (and
    the loaded dataset and its partitioner, for the next client); with one it keeps only
    the client it served last, and reads the others' files (milliseconds), so its memory
    does not grow with the clients it serves. In simulation the ServerApp has written every
    client's file before round 1 (:func:`write_partitions`), so no worker imports the
    dataset libraries or partitions anything; in deployment (a new process per message)
    later messages read what the first one wrote. A file is keyed by
    :func:`~fml_flower.tensors.partition_fingerprint` and refused on a mismatch.
    """

    def __init__(self) -> None:
        self._clients: dict[tuple[str, int, int, str], tuple[ClientData, DatasetInfo]] = {}
        self._dataset: tuple[tuple[str, int], FederatedImageData] | None = None

    def get(
        self, cfg: FMLConfig, pid: int, n: int, cache_dir: Path | None
    ) -> tuple[ClientData, DatasetInfo]:
        """Client ``pid`` of ``n``'s data (its own dataset's share, if several)."""
        device = resolve_device(cfg.train.device)
        data_cfg, pid, n = data_for_client(cfg.data, pid, n)
        key = (to_yaml(data_cfg), pid, n, str(device))  # type: ignore[arg-type]
        if key not in self._clients:
            loaded, path, fingerprint = None, None, ""
            if cache_dir is not None:
                fingerprint = partition_fingerprint(data_cfg, pid, n)
                path = partition_cache_file(cache_dir, fingerprint, pid)
                loaded = load_partition(path, fingerprint)
            if loaded is None:
                data = self.dataset(data_cfg, n)
                loaded = (data.client(pid, n), data.info)
                if path is not None:
                    save_partition(path, loaded[0], loaded[1], fingerprint)
            if cache_dir is not None:
                self._clients.clear()  # on disk: keep only this client in memory
            self._clients[key] = (loaded[0].to(device), loaded[1])
        return self._clients[key]

    def dataset(self, data: DataConfig, n: int) -> FederatedImageData:
        """The dataset and its partitioner (the last setting asked for is kept)."""
        from fml_flower.data import federated_data  # the dataset libraries, only here

        key = (to_yaml(data), n)  # type: ignore[arg-type]
        if self._dataset is None or self._dataset[0] != key:
            self._dataset = (key, federated_data(data, n))
        return self._dataset[1]


DATA = ClientDataCache()


def partition_folder(cfg: FMLConfig, context: Context) -> Path:
    """Where this node keeps ready partition tensors: its ``state-dir`` itself (kept across
    runs), else the ``partitions`` folder of its state folder (in simulation, where the
    ServerApp writes every client's before round 1; see :func:`store_folder`).
    """
    node_dir = state_dir_of(context)
    return node_dir if node_dir is not None else store_folder(cfg, context) / "partitions"


def personal_identity(cfg: FMLConfig, pid: int, num_partitions: int) -> dict[str, str]:
    """What a saved personalized model must share with the run that restores it."""
    d, own_pid, n = data_for_client(cfg.data, pid, num_partitions)
    split = (
        f"{d.source}:{d.name}:{d.partitioner}:classes={d.classes_per_client}:"
        f"dirichlet={d.dirichlet_alpha}:test={d.test_fraction}:seed={d.seed}:"
        f"clients={num_partitions}"
    )
    if d.partitioner == "shard":
        split += f":shards={d.shards_per_client}"
    if cfg.data.name_per_client:  # several datasets: the client's share of its own
        split += f":{n} clients of {d.name}, share {own_pid}"
    return {"method": cfg.train.method, "data split": split}


def client_round(
    msg: Message, context: Context
) -> tuple[ClientRound, Method, dict[str, float], NodeStore]:
    """The method's view of this message: settings, received arrays, data, store.

    The store is the node's :class:`NodeStore`. When this run has not written it yet (a
    node's first round of the run, a restarted SuperNode) and the folder holds a state
    saved before, it is restored first (a resumed run: the version of the round the
    server's checkpoint holds).
    """
    cfg = client_config(context, msg)
    method = get_method(cfg.train.method)
    pid, n = partition_of(context)
    data, info = DATA.get(cfg, pid, n, partition_folder(cfg, context))
    folder = store_folder(cfg, context)
    store = NodeStore(
        context.state,
        folder,
        pid,
        personal_identity(cfg, pid, n),
        keep_previous=folder != run_scratch_dir(context.run_id),
    )
    notes: dict[str, float] = {}
    config = msg.content["config"]
    is_train = msg.metadata.message_type == "train"
    settings = (
        RoundSettings.from_config(config)  # type: ignore[arg-type]
        if is_train
        else RoundSettings.for_evaluation(config)  # type: ignore[arg-type]
    )
    arch = method.personal_arch(cfg, pid)
    if arch is not None and not store.has_record():
        # a resumed run continues from the round the server's checkpoint holds
        newest = settings.round - 1 if is_train else settings.round
        restored = store.restore(arch, newest if cfg.federation.resume_from else None)
        notes["personal_restored_from_disk"] = float(restored)
    private_keys: list[str] = []
    if method.supports_private_patterns and cfg.model.private_patterns:  # FML's private head
        meme = build_model(cfg.model.meme, info.input_shape, info.num_classes)
        private_keys = method.private_keys(cfg, meme)
    r = ClientRound(
        cfg=cfg,
        partition_id=pid,
        settings=settings,
        received=msg.content["arrays"].to_torch_state_dict(),  # type: ignore[union-attr]
        data=data,
        info=info,
        store=store,
        private_keys=private_keys,
    )
    return r, method, notes, store


TRAINED = "fml-flower.trained"
"""``context.state`` key, with in-train evaluation only (the strategy then sends
``evaluate-before-train`` in every training config, False in the rounds that are not
scored): the last round this client trained in (this run), so that it scores nothing
before its first round."""


def evaluate_before_training(
    msg: Message, context: Context, r: ClientRound, method: Method, resumed_from_disk: bool
) -> dict[str, float]:
    """With ``federation.evaluation: in-train`` (the config key ``evaluate-before-train``),
    the method's evaluation of what this client holds from its last round (the received
    global model, its own models), prefixed ``eval.``: what a separate evaluation message
    of that round would have returned. Nothing before the client's first round of the run
    (a separate evaluation would not have asked it either), except for a client whose
    personalized model was just restored from its state-dir in a resumed run or after
    round 1 (a restarted SuperNode): it scores what it restored.
    """
    if not msg.content["config"].get(EVALUATE_BEFORE_TRAIN):  # type: ignore[union-attr]
        return {}
    if TRAINED not in context.state and not resumed_from_disk:
        return {}
    t0 = time.perf_counter()
    scores: dict[str, float] = {"num-examples": len(r.test), **method.evaluate(r)}
    scores["eval_seconds"] = time.perf_counter() - t0
    return {EVAL_PREFIX + k: v for k, v in scores.items()}


@app.train(mods=[attack_mod, privacy_mod])
def train(msg: Message, context: Context) -> Message:
    """One round of the configured method on this client (the reply then passes the
    client half of ``privacy.mode`` and, in a poisoning experiment, ``attack``).
    """
    with naming_partition(_partition_or_none(context)):
        return _train(msg, context)


def _partition_or_none(context: Context) -> int | None:
    try:
        return int(context.node_config["partition-id"])
    except (KeyError, TypeError, ValueError):
        return None


def _train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    r, method, notes, store = client_round(msg, context)
    restored = notes.get("personal_restored_from_disk") == 1.0  # a resumed run, a restarted node
    resumed = restored and (bool(r.cfg.federation.resume_from) or r.settings.round > 1)
    scored = evaluate_before_training(msg, context, r, method, resumed)
    t1 = time.perf_counter()
    arrays, metrics = method.train(r)
    store.flush(r.settings.round)
    if EVALUATE_BEFORE_TRAIN in msg.content["config"]:  # type: ignore[operator]
        context.state[TRAINED] = ConfigRecord({"round": r.settings.round})
    notes.update(setup_seconds=t1 - t0, train_seconds=time.perf_counter() - t1)
    reply = {**metrics, **notes, "num-examples": len(r.data.train), "partition_id": r.partition_id}
    reply.update(used_settings(r.settings))
    reply.update(scored)
    content = RecordDict({"metrics": MetricRecord(reply)})
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    return Message(content=content, reply_to=msg)


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """This node's partition, so that the server can map node ids to partition ids (used
    for ``federation.join_round``). Loads no data and builds no model.
    """
    pid, n = partition_of(context)
    metrics = MetricRecord({"partition_id": pid, "num_partitions": n})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The method's models on this client's own test part."""
    with naming_partition(_partition_or_none(context)):
        return _evaluate(msg, context)


def _evaluate(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    r, method, _, _ = client_round(msg, context)
    metrics: dict[str, float] = {"num-examples": len(r.test), "partition_id": r.partition_id}
    metrics.update(method.evaluate(r))
    metrics["eval_seconds"] = time.perf_counter() - t0
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
