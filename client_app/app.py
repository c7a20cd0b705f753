"""The FML ClientApp: a private personalized model and a meme forked from the global one.

``train``: meme <- global arrays with a fresh optimizer; personalized model and its
optimizer restored from ``context.state`` (created on first participation with this
client's architecture); E epochs of deep mutual learning; personalized model stored back;
reply with the meme's arrays only and metrics holding ``num-examples``.

``evaluate``: the global model and the personalized model on the client's own test part.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.state import has_personal_model, load_personal, save_personal
from fml_flower.config import FMLConfig, config_from_run_config, to_yaml
from fml_flower.data import ClientData, DatasetInfo, federated_data
from fml_flower.models import build_model
from fml_flower.training import EpochStats, evaluate, mutual_learning_epoch, sgd

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


_DATA_CACHE: dict[tuple[str, int, int], tuple[ClientData, DatasetInfo]] = {}


def client_data(cfg: FMLConfig, pid: int, n: int) -> tuple[ClientData, DatasetInfo]:
    """This client's train/test tensors, loaded and partitioned once per process."""
    key = (to_yaml(cfg.data), pid, n)
    if key not in _DATA_CACHE:
        data = federated_data(cfg.data, n)
        _DATA_CACHE[key] = (data.client(pid, n), data.info)
    return _DATA_CACHE[key]


def local_arch(cfg: FMLConfig, pid: int) -> str:
    """The personalized model's architecture of client ``pid``."""
    return cfg.model.local_per_client.get(pid, cfg.model.local)


def seed_for(cfg: FMLConfig, pid: int, server_round: int = 0) -> int:
    """A distinct, reproducible seed per client (and round)."""
    return cfg.seed + 7919 * (pid + 1) + 104729 * server_round


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One FML round on this client."""
    cfg = client_config(context)
    pid, n = partition_of(context)
    data, info = client_data(cfg, pid, n)
    rc = msg.content["config"]
    server_round = int(rc["server-round"])
    lr, alpha, beta = float(rc["lr"]), float(rc["alpha"]), float(rc["beta"])
    t = cfg.train

    meme = build_model(cfg.model.meme, info.input_shape, info.num_classes)
    meme.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    opt_meme = sgd(meme, lr, t.momentum, t.weight_decay)

    arch = local_arch(cfg, pid)
    local = build_model(arch, info.input_shape, info.num_classes, seed=seed_for(cfg, pid))
    opt_local = sgd(local, lr, t.momentum, t.weight_decay)
    if has_personal_model(context):
        load_personal(context, local, opt_local, arch)
        for group in opt_local.param_groups:
            group["lr"] = lr

    generator = torch.Generator().manual_seed(seed_for(cfg, pid, server_round))
    stats = EpochStats()
    for _ in range(t.local_epochs):
        mutual_learning_epoch(
            local,
            meme,
            opt_local,
            opt_meme,
            data.train.x,
            data.train.y,
            t.batch_size,
            alpha,
            beta,
            t.update,
            generator,
            stats,
        )
    save_personal(context, local, opt_local, arch)

    metrics = {**stats.means(), "num-examples": len(data.train), "partition_id": pid}
    content = RecordDict(
        {"arrays": ArrayRecord(meme.state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_models(msg: Message, context: Context) -> Message:
    """Global and personalized model on this client's own test part."""
    cfg = client_config(context)
    pid, n = partition_of(context)
    data, info = client_data(cfg, pid, n)
    test = data.test

    global_model = build_model(cfg.model.meme, info.input_shape, info.num_classes)
    global_model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    g = evaluate(global_model, test.x, test.y)
    metrics: dict[str, float | int] = {
        "num-examples": len(test),
        "partition_id": pid,
        "global_acc": g.accuracy,
        "global_loss": g.loss,
    }
    if has_personal_model(context):
        arch = local_arch(cfg, pid)
        local = build_model(arch, info.input_shape, info.num_classes)
        load_personal(context, local, None, arch)
        p = evaluate(local, test.x, test.y)
        metrics.update(personal_acc=p.accuracy, personal_loss=p.loss)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
