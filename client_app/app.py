"""The ClientApp: FML (and the baselines) on the client's own data partition.

``train`` (FML): meme <- global arrays with a fresh optimizer; personalized model and its
optimizer restored from ``context.state`` (created on first participation with this
client's architecture); E epochs of deep mutual learning; personalized model stored back;
reply with the meme's arrays only and metrics holding ``num-examples``.

``evaluate``: the global model and the personalized model on the client's own test part.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.methods import (
    TRAINERS,
    RoundInput,
    global_model,
    load_body,
    personal_arch,
    personal_identity,
)
from client_app.state import has_personal_model, load_personal, restore_from_disk
from fml_flower.config import (
    ConfigError,
    DataConfig,
    FMLConfig,
    config_from_run_config,
    data_for_client,
    to_yaml,
    validate,
)
from fml_flower.models import build_model, resolve_device
from fml_flower.tensors import (
    ClientData,
    DatasetInfo,
    load_partition,
    partition_cache_file,
    save_partition,
)
from fml_flower.training import evaluate

if TYPE_CHECKING:
    from fml_flower.data import FederatedImageData

app = ClientApp()


@lru_cache(maxsize=4)
def _config(run_config_items: tuple[tuple[str, object], ...]) -> FMLConfig:
    return config_from_run_config(dict(run_config_items))


def client_config(context: Context) -> FMLConfig:
    """The run's validated configuration (built once per process and run-config)."""
    cfg = _config(tuple(sorted(context.run_config.items())))
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    return cfg


def partition_of(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node's configuration."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as err:
        raise KeyError(
            f"node config lacks {err}; start the SuperNode with --node-config "
            '"partition-id=<i> num-partitions=<n>"'
        ) from err


_DATA_CACHE: dict[tuple[str, int, int, str], tuple[ClientData, DatasetInfo]] = {}


_DATASETS: dict[tuple[str, int], FederatedImageData] = {}


def _federated_data(data: DataConfig, n: int) -> FederatedImageData:
    """The dataset and its partitioner, once per process (a simulation worker serves many
    clients, and the partitioner assigns all partitions at once).
    """
    from fml_flower.data import federated_data  # the dataset libraries, only here

    key = (to_yaml(data), n)  # type: ignore[arg-type]
    if key not in _DATASETS:
        _DATASETS.clear()  # one dataset setting at a time
        _DATASETS[key] = federated_data(data, n)
    return _DATASETS[key]


def data_fingerprint(cfg: FMLConfig, pid: int, n: int) -> str:
    """What a client's partition depends on: the data settings, the partition, and for a
    local folder the names, sizes and modification times of its files.
    """
    d = cfg.data
    parts = [to_yaml(d), f"partition {pid} of {n}"]  # type: ignore[arg-type]
    if d.source == "local":
        folder = Path(d.root).expanduser() / d.name
        for f in sorted(folder.glob("*")):
            if f.is_file():
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


def client_data(
    cfg: FMLConfig, pid: int, n: int, cache_dir: Path | None = None
) -> tuple[ClientData, DatasetInfo]:
    """This client's train/test tensors on its device.

    Built once per process (kept in memory: simulation workers live for the whole run) and,
    with a ``cache_dir`` (the node's ``state-dir``), once per node: the ready tensors are
    written there and read back by later ClientApp processes, which then never import the
    dataset libraries or re-partition (deployment starts a new process per message).
    """
    device = resolve_device(cfg.train.device)
    data_cfg, pid, n = data_for_client(cfg.data, pid, n)  # its own dataset, if several
    cfg = replace(cfg, data=data_cfg)
    key = (to_yaml(cfg.data), pid, n, str(device))  # type: ignore[arg-type]
    if key not in _DATA_CACHE:
        loaded, path, fingerprint = None, None, ""
        if cache_dir is not None:
            fingerprint = data_fingerprint(cfg, pid, n)
            path = partition_cache_file(cache_dir, fingerprint, pid)
            loaded = load_partition(path, fingerprint)
        if loaded is None:
            data = _federated_data(cfg.data, n)
            loaded = (data.client(pid, n), data.info)
            if path is not None:
                save_partition(path, loaded[0], loaded[1], fingerprint)
        _DATA_CACHE[key] = (loaded[0].to(device), loaded[1])
    return _DATA_CACHE[key]


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


def round_input(msg: Message, context: Context) -> RoundInput:
    """Configuration, data and the received records of one message.

    With a ``state-dir`` and an empty ``context.state`` (a new run or a restarted
    SuperNode), the personalized model saved on disk is restored first.
    """
    cfg = node_overrides(client_config(context), context)
    pid, n = partition_of(context)
    state_dir = state_dir_of(context)
    data, info = client_data(cfg, pid, n, state_dir)
    inp = RoundInput(
        cfg,
        context,
        pid,
        n,
        data,
        info,
        msg.content["arrays"],
        msg.content["config"],
        state_dir=state_dir,
    )
    if inp.state_dir is not None and not has_personal_model(context):
        restored = restore_from_disk(
            context, inp.state_dir, pid, personal_arch(cfg, pid), personal_identity(cfg, pid, n)
        )
        inp.notes["personal_restored_from_disk"] = float(restored)
    return inp


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of the configured method on this client."""
    t0 = time.perf_counter()
    inp = round_input(msg, context)
    t1 = time.perf_counter()
    arrays, metrics = TRAINERS[inp.cfg.train.method](inp)
    inp.notes.update(
        setup_seconds=t1 - t0,
        train_seconds=time.perf_counter() - t1,
        torch_threads=torch.get_num_threads(),
        worker_pid=os.getpid(),  # which simulation worker (process) ran this client
    )
    content = RecordDict(
        {
            "metrics": MetricRecord(
                {
                    **metrics,
                    **inp.notes,
                    "num-examples": len(inp.data.train),
                    "partition_id": inp.pid,
                }
            )
        }
    )
    if arrays is not None:
        content["arrays"] = arrays
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
def evaluate_models(msg: Message, context: Context) -> Message:
    """Global and personalized model on this client's own test part."""
    t0 = time.perf_counter()
    inp = round_input(msg, context)
    cfg, test, method = inp.cfg, inp.data.test, inp.cfg.train.method
    metrics: dict[str, float | int] = {"num-examples": len(test), "partition_id": inp.pid}
    if method in ("fml", "fedavg", "fedprox", "ditto"):
        g = evaluate(global_model(inp), test.x, test.y)
        metrics.update(global_acc=g.accuracy, global_loss=g.loss)
    if method in ("fedavg", "fedprox"):  # the global model is what these clients use
        metrics.update(personal_acc=metrics["global_acc"], personal_loss=metrics["global_loss"])
    elif has_personal_model(context):
        arch = personal_arch(cfg, inp.pid)
        personal = build_model(arch, inp.info.input_shape, inp.info.num_classes).to(inp.device)
        load_personal(context, personal, None, arch)
        if method == "fedper":  # today's body with the client's own head
            load_body(personal, inp.arrays)
        p = evaluate(personal, test.x, test.y)
        metrics.update(personal_acc=p.accuracy, personal_loss=p.loss)
    metrics.update(eval_seconds=time.perf_counter() - t0, worker_pid=os.getpid())
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
