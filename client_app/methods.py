"""Client-side training of each method: FML and the baselines, on the same data and models.

Every function trains for one round and returns the arrays to send back (``None`` for
none) and the training metrics. Personal state lives in ``context.state``
(:mod:`client_app.state`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from torch import nn

from client_app.state import (
    has_personal_model,
    load_personal,
    persist_personal,
    save_personal,
)
from fml_flower.config import FMLConfig, data_for_client
from fml_flower.models import build_model, cpu_state_dict, head_keys, matching_keys
from fml_flower.tensors import ClientData, DatasetInfo
from fml_flower.training import EpochStats, mutual_learning_epoch, sgd, supervised_epoch


@dataclass
class RoundInput:
    """Everything one client round needs."""

    cfg: FMLConfig
    context: Context
    pid: int
    n: int
    """Number of partitions (clients) the data is split into."""
    data: ClientData
    info: DatasetInfo
    arrays: ArrayRecord
    config: ConfigRecord
    state_dir: Path | None = None
    """Node-local folder for the durable copy of the personalized model (node config)."""
    notes: dict[str, float] = field(default_factory=dict)
    """Extra metrics gathered on the way (e.g. whether the model came from disk)."""

    @property
    def server_round(self) -> int:
        """The round number (absolute, also in a resumed run)."""
        return int(self.config.get("round", self.config["server-round"]))

    @property
    def lr(self) -> float:
        """This round's learning rate (the server applies the decay)."""
        return float(self.config["lr"])

    @property
    def device(self) -> torch.device:
        """Where this client trains (the data tensors already live there)."""
        return self.data.train.x.device

    def generator(self) -> torch.Generator:
        """The batch-order generator of this client and round."""
        return torch.Generator().manual_seed(seed_for(self.cfg, self.pid, self.server_round))

    def optimizer(self, model: nn.Module) -> torch.optim.SGD:
        """A new SGD optimizer for ``model`` with this round's learning rate."""
        t = self.cfg.train
        return sgd(model, self.lr, t.momentum, t.weight_decay)


TrainResult = tuple[ArrayRecord | None, dict[str, float]]


def seed_for(cfg: FMLConfig, pid: int, server_round: int = 0) -> int:
    """A distinct, reproducible seed per client (and round)."""
    return cfg.seed + 7919 * (pid + 1) + 104729 * server_round


def personal_identity(cfg: FMLConfig, pid: int, num_partitions: int) -> dict[str, str]:
    """What a saved personalized model must share with the run that restores it."""
    d, own_pid, n = data_for_client(cfg.data, pid, num_partitions)
    split = (
        f"{d.source}:{d.name}:{d.partitioner}:classes={d.classes_per_client}:"
        f"dirichlet={d.dirichlet_alpha}:test={d.test_fraction}:seed={d.seed}:"
        f"clients={num_partitions}"
    )
    if cfg.data.name_per_client:  # several datasets: the client's share of its own
        split += f":{n} clients of {d.name}, share {own_pid}"
    return {"method": cfg.train.method, "data split": split}


def local_arch(cfg: FMLConfig, pid: int) -> str:
    """The personalized model's architecture of client ``pid`` (after node overrides)."""
    return cfg.model.local_per_client.get(pid, cfg.model.local)


def personal_arch(cfg: FMLConfig, pid: int) -> str:
    """Architecture of the model a client keeps: its own for FML/local, the global one's
    for Ditto and FedPer (whose personal models share the global architecture).
    """
    if cfg.train.method in ("ditto", "fedper"):
        return cfg.model.meme
    return local_arch(cfg, pid)


MEME_PRIVATE_KEY = "fml.meme.private"
"""``context.state`` key of the meme's private part (``model.private_patterns``)."""


def global_model(inp: RoundInput) -> nn.Module:
    """The meme/global architecture loaded with the received arrays.

    With ``model.private_patterns`` (FML only) the server sends the shared part alone: the
    private part (a task-specific head) comes from this client's state, or a per-client
    initialization on its first round.
    """
    patterns = inp.cfg.model.private_patterns if inp.cfg.train.method == "fml" else []
    model = build_model(
        inp.cfg.model.meme,
        inp.info.input_shape,
        inp.info.num_classes,
        seed=seed_for(inp.cfg, inp.pid) + 1 if patterns else None,
    )
    if not patterns:
        model.load_state_dict(inp.arrays.to_torch_state_dict())
        return model.to(inp.device)
    load_body(model, inp.arrays)
    private = set(matching_keys(model, patterns))
    missing = set(model.state_dict()) - set(inp.arrays.keys()) - private
    if missing:
        raise KeyError(f"the server's arrays lack shared meme keys {sorted(missing)}")
    if MEME_PRIVATE_KEY in inp.context.state:
        model.load_state_dict(
            inp.context.state[MEME_PRIVATE_KEY].to_torch_state_dict(), strict=False
        )
    return model.to(inp.device)


def split_private(inp: RoundInput, meme: nn.Module) -> ArrayRecord:
    """Keep the meme's private part in the client's state; return the shared part."""
    state = cpu_state_dict(meme)
    if inp.cfg.train.method != "fml" or not inp.cfg.model.private_patterns:
        return ArrayRecord(state)
    private = set(matching_keys(meme, inp.cfg.model.private_patterns))
    inp.context.state[MEME_PRIVATE_KEY] = ArrayRecord({k: state[k] for k in private})
    return ArrayRecord({k: v for k, v in state.items() if k not in private})


def restore_personal(
    inp: RoundInput, keep_optimizer_state: bool = True, init_from_global: bool = False
) -> tuple[nn.Module, torch.optim.SGD]:
    """The personalized model and its optimizer: restored, or created on first use.

    ``keep_optimizer_state=False`` gives a fresh optimizer (FedPer, whose body is replaced
    by the global one every round); ``init_from_global`` starts a new personal model from
    the received global weights (Ditto) instead of the client's own initialization.
    """
    arch = personal_arch(inp.cfg, inp.pid)
    model = build_model(
        arch, inp.info.input_shape, inp.info.num_classes, seed=seed_for(inp.cfg, inp.pid)
    ).to(inp.device)
    opt = inp.optimizer(model)
    if has_personal_model(inp.context):
        load_personal(inp.context, model, opt if keep_optimizer_state else None, arch)
        for group in opt.param_groups:
            group["lr"] = inp.lr
    elif init_from_global:
        model.load_state_dict(inp.arrays.to_torch_state_dict())
    inp.notes["personal_fingerprint_start"] = fingerprint(model)
    return model, opt


def fingerprint(model: nn.Module) -> float:
    """Sum of absolute parameter values: tells a restored model from a fresh one."""
    with torch.no_grad():
        return float(sum(p.abs().sum().item() for p in model.parameters()))


def store_personal(inp: RoundInput, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Keep the personalized model in ``context.state`` and, with a state dir, on disk."""
    save_personal(inp.context, model, opt, personal_arch(inp.cfg, inp.pid))
    if inp.state_dir is not None:
        persist_personal(
            inp.context, inp.state_dir, inp.pid, personal_identity(inp.cfg, inp.pid, inp.n)
        )


def train_fml(inp: RoundInput) -> TrainResult:
    """Deep mutual learning of the personalized model and a fresh meme."""
    t = inp.cfg.train
    meme = global_model(inp)
    opt_meme = inp.optimizer(meme)  # a new optimizer every round: fresh momentum
    local, opt_local = restore_personal(inp)
    alpha, beta = float(inp.config["alpha"]), float(inp.config["beta"])
    gen, stats = inp.generator(), EpochStats()
    x, y = inp.data.train.x, inp.data.train.y
    for _ in range(t.local_epochs):
        mutual_learning_epoch(
            local, meme, opt_local, opt_meme, x, y, t.batch_size, alpha, beta, t.update, gen, stats
        )
    store_personal(inp, local, opt_local)
    return split_private(inp, meme), stats.means()


def train_fedavg(inp: RoundInput) -> TrainResult:
    """Cross-entropy training of the global model (FedProx: plus the proximal term)."""
    t = inp.cfg.train
    model = global_model(inp)
    opt = inp.optimizer(model)
    mu = float(inp.config.get("proximal-mu", 0.0))
    anchor = [p.detach().clone() for p in model.parameters()]
    gen, stats = inp.generator(), EpochStats()
    for _ in range(t.local_epochs):
        supervised_epoch(
            model,
            opt,
            inp.data.train.x,
            inp.data.train.y,
            t.batch_size,
            gen,
            proximal_mu=mu,
            anchor=anchor,
            stats=stats,
        )
    return ArrayRecord(cpu_state_dict(model)), _meme_columns(stats)


def train_ditto(inp: RoundInput) -> TrainResult:
    """The global model as in FedAvg, then the personal model towards the received one."""
    t = inp.cfg.train
    model = global_model(inp)
    anchor = [p.detach().clone() for p in model.parameters()]
    opt = inp.optimizer(model)
    personal, opt_personal = restore_personal(inp, init_from_global=True)
    lam = float(inp.config["ditto-lambda"])
    gen = inp.generator()
    g_stats, p_stats = EpochStats(), EpochStats()
    x, y = inp.data.train.x, inp.data.train.y
    for _ in range(t.local_epochs):
        supervised_epoch(model, opt, x, y, t.batch_size, gen, stats=g_stats)
    for _ in range(t.local_epochs):
        supervised_epoch(
            personal,
            opt_personal,
            x,
            y,
            t.batch_size,
            gen,
            proximal_mu=lam,
            anchor=anchor,
            stats=p_stats,
        )
    store_personal(inp, personal, opt_personal)
    return ArrayRecord(cpu_state_dict(model)), {**p_stats.means(), **_meme_columns(g_stats)}


def train_fedper(inp: RoundInput) -> TrainResult:
    """The received body with this client's own head; only the body goes back."""
    t = inp.cfg.train
    model, opt = restore_personal(inp, keep_optimizer_state=False)
    private = set(head_keys(model))
    load_body(model, inp.arrays)
    gen, stats = inp.generator(), EpochStats()
    for _ in range(t.local_epochs):
        supervised_epoch(
            model, opt, inp.data.train.x, inp.data.train.y, t.batch_size, gen, stats=stats
        )
    store_personal(inp, model, opt)
    body = {k: v for k, v in cpu_state_dict(model).items() if k not in private}
    return ArrayRecord(body), stats.means()


def train_local(inp: RoundInput) -> TrainResult:
    """The client's own model on its own data; nothing is sent back but metrics."""
    t = inp.cfg.train
    model, opt = restore_personal(inp)
    gen, stats = inp.generator(), EpochStats()
    for _ in range(t.local_epochs):
        supervised_epoch(
            model, opt, inp.data.train.x, inp.data.train.y, t.batch_size, gen, stats=stats
        )
    store_personal(inp, model, opt)
    return None, stats.means()


def load_body(model: nn.Module, arrays: ArrayRecord) -> None:
    """Load the shared arrays into ``model``, refusing any key the model lacks."""
    result = model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
    if result.unexpected_keys:
        raise KeyError(f"received arrays the model does not have: {result.unexpected_keys}")


def _meme_columns(stats: EpochStats) -> dict[str, float]:
    """Report a global-model-only run's loss in the meme (shared model) columns."""
    m = stats.means()
    return {"train_loss_meme": m["train_loss_local"], "train_acc_meme": m["train_acc_local"]}


TRAINERS: dict[str, Callable[[RoundInput], TrainResult]] = {
    "fml": train_fml,
    "fedavg": train_fedavg,
    "fedprox": train_fedavg,
    "ditto": train_ditto,
    "fedper": train_fedper,
    "local": train_local,
}
