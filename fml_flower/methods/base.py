"""What every method is made of, and the round a client runs, in plain PyTorch.

A method module (``fml_flower/methods/<name>.py``) defines one :class:`Method`: what its
client trains and evaluates, what it sends and keeps, whether the server holds a complete
global model, which keys stay private, and which strategy serves it. The ClientApp and the
ServerApp look the method up once in :data:`fml_flower.methods.METHODS` and call these
fields; nothing else compares the method's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from fml_flower.config import FMLConfig
from fml_flower.models import build_model, matching_keys
from fml_flower.personal import (
    MEME_PRIVATE,
    PERSONAL,
    PersonalStore,
    SavedModel,
    architecture_signature,
    cpu_state,
    load_model,
    save_model,
)
from fml_flower.settings import RoundSettings
from fml_flower.tensors import ClientData, DatasetInfo, TensorSplit
from fml_flower.training import (
    FP32,
    Compute,
    EpochStats,
    Step,
    evaluate,
    resolve_last_batch,
    run_epochs,
    sgd,
)

State = dict[str, torch.Tensor]


def seed_for(cfg: FMLConfig, pid: int, server_round: int = 0) -> int:
    """A distinct, reproducible seed per client (and round)."""
    return cfg.seed + 7919 * (pid + 1) + 104729 * server_round


@dataclass
class ClientRound:
    """One client's round: what it received, its data, and where its own state lives."""

    cfg: FMLConfig
    partition_id: int
    settings: RoundSettings
    received: State
    """The global (shared) arrays the server sent; empty for a method that sends none."""
    data: ClientData
    info: DatasetInfo
    store: PersonalStore
    private_keys: list[str] = field(default_factory=list)
    """Meme keys that stay on this client (FML's private meme part)."""

    @property
    def device(self) -> torch.device:
        """Where this client trains (the data tensors already live there)."""
        return self.data.train.x.device

    @property
    def local_arch(self) -> str:
        """This client's own architecture (``model.local``, or its per-client override)."""
        return self.cfg.model.local_per_client.get(self.partition_id, self.cfg.model.local)

    @property
    def compute(self) -> Compute:
        """This client's precision and memory format (``train.precision``,
        ``train.memory_format`` resolved for its device).
        """
        t = self.cfg.train
        return Compute.resolve(t.precision, t.memory_format, self.device)

    def build(self, arch: str, seed: int | None = None) -> nn.Module:
        """A new model of ``arch`` for this client's data, on its device, in its memory
        format.
        """
        model = build_model(arch, self.info.input_shape, self.info.num_classes, seed=seed)
        return self.compute.model(model.to(self.device))

    def generator(self) -> torch.Generator:
        """The batch-order generator of this client and round."""
        seed = seed_for(self.cfg, self.partition_id, self.settings.round)
        return torch.Generator().manual_seed(seed)

    def optimizer(self, model: nn.Module) -> torch.optim.SGD:
        """A new SGD optimizer for ``model`` with this round's settings."""
        s = self.settings
        return sgd(model, s.lr, s.momentum, s.weight_decay)

    def global_model(self) -> nn.Module:
        """The meme/global architecture loaded with the received arrays.

        With private meme keys the server sends the shared part alone: the private part
        comes from this client's store, or a per-client initialization on its first round.
        """
        if not self.private_keys:
            model = self.build(self.cfg.model.meme)
            model.load_state_dict(self.received)
            return model
        model = self.build(self.cfg.model.meme, seed=seed_for(self.cfg, self.partition_id) + 1)
        missing = set(model.state_dict()) - set(self.received) - set(self.private_keys)
        if missing:
            raise KeyError(f"the server's arrays lack shared meme keys {sorted(missing)}")
        load_body(model, self.received)
        load_model(self.store, MEME_PRIVATE, model, strict=False)
        return model

    def shared_part(self, meme: nn.Module) -> State:
        """What of ``meme`` goes back: all of it, or (with private keys) the shared part,
        the private part being kept in the store.
        """
        state = cpu_state(meme)
        if not self.private_keys:
            return state
        part = {k: state[k] for k in self.private_keys}
        self.store.save(MEME_PRIVATE, SavedModel(part, b"", architecture_signature(part)))
        return {k: v for k, v in state.items() if k not in self.private_keys}

    def personal_model(
        self, arch: str, keep_optimizer_state: bool = True, init_from_global: bool = False
    ) -> tuple[nn.Module, torch.optim.SGD]:
        """The personalized model and its optimizer: restored, or created on first use.

        ``keep_optimizer_state=False`` gives a fresh optimizer (FedPer, whose body is
        replaced by the global one every round); ``init_from_global`` starts a new personal
        model from the received global weights (Ditto) instead of the client's own
        initialization.
        """
        model = self.build(arch, seed=seed_for(self.cfg, self.partition_id))
        opt = self.optimizer(model)
        restored = load_model(self.store, PERSONAL, model, opt if keep_optimizer_state else None)
        if not restored and init_from_global:
            model.load_state_dict(self.received)
        return model, opt

    def saved_personal(self, arch: str) -> nn.Module | None:
        """The stored personalized model (for evaluation), or None before its first round."""
        model = self.build(arch)
        return model if load_model(self.store, PERSONAL, model) else None

    def keep(self, model: nn.Module, opt: torch.optim.Optimizer | None, arch: str) -> None:
        """Store the personalized model (and its optimizer state) for the next round."""
        save_model(self.store, PERSONAL, model, opt, arch)

    def train(self, step: Step, stats: EpochStats | None = None) -> EpochStats:
        """``settings.local_epochs`` epochs of ``step`` over this client's train part."""
        return self.train_with(step, self.generator(), stats)

    def train_with(
        self, step: Step, generator: torch.Generator, stats: EpochStats | None = None
    ) -> EpochStats:
        """As :meth:`train`, with a given batch-order generator (shared by two phases)."""
        train = self.data.train
        return run_epochs(
            step,
            (train.x, train.y),
            self.settings.batch_size,
            self.settings.local_epochs,
            generator,
            resolve_last_batch(self.cfg.train.last_batch, self.settings.distillation or "faithful"),
            stats,
        )

    def scores(self, prefix: str, model: nn.Module) -> dict[str, float]:
        """``<prefix>_acc`` and ``<prefix>_loss`` of ``model`` on this client's test part."""
        return scores(prefix, model, self.test, self.compute)

    @property
    def test(self) -> TensorSplit:
        """This client's own test part."""
        return self.data.test


def load_body(model: nn.Module, arrays: State) -> None:
    """Load the shared arrays into ``model``, refusing any key the model lacks."""
    result = model.load_state_dict(arrays, strict=False)
    if result.unexpected_keys:
        raise KeyError(f"received arrays the model does not have: {result.unexpected_keys}")


def scores(
    prefix: str, model: nn.Module, split: TensorSplit, compute: Compute = FP32
) -> dict[str, float]:
    """``<prefix>_acc`` and ``<prefix>_loss`` of ``model`` on ``split``."""
    res = evaluate(model, split.x, split.y, compute=compute)
    return {f"{prefix}_acc": res.accuracy, f"{prefix}_loss": res.loss}


def as_meme_columns(stats: EpochStats) -> dict[str, float]:
    """Report a single shared model's training loss in the meme (shared model) columns."""
    m = stats.means()
    return {"train_loss_meme": m["train_loss_local"], "train_acc_meme": m["train_acc_local"]}


Update = tuple[State | None, dict[str, float]]
"""What a client's round returns: the arrays it sends (None: nothing) and its metrics."""


def no_keys(cfg: FMLConfig, meme: nn.Module) -> list[str]:
    """No private keys: the whole model is shared."""
    return []


def no_options(cfg: FMLConfig) -> dict[str, Any]:
    """No method-specific strategy arguments."""
    return {}


@dataclass(frozen=True)
class Method:
    """One federated method, in one place."""

    name: str
    description: str
    train: Callable[[ClientRound], Update]
    """One round of client training: the arrays to send and the training metrics."""
    evaluate: Callable[[ClientRound], dict[str, float]]
    """The client's models on its own test part: ``global_*`` and/or ``personal_*``."""
    strategy: str
    """The Flower strategy serving it, as ``module:Class`` (imported by the ServerApp)."""
    keeps: Literal["own", "global", "nothing"]
    """What the client keeps between rounds: a model of its own architecture, a model of
    the global architecture (Ditto, FedPer, FedRep), or nothing (FedAvg, FedProx)."""
    has_global_model: bool
    """Whether the server's model is a complete model clients use (evaluated centrally,
    unless private keys keep part of it on the clients)."""
    private_keys: Callable[[FMLConfig, nn.Module], list[str]] = no_keys
    """Keys of the global architecture that never leave the clients."""
    strategy_options: Callable[[FMLConfig], dict[str, Any]] = no_options
    """The strategy's method-specific constructor arguments from the configuration."""
    supports_private_patterns: bool = False
    """Whether ``model.private_patterns`` applies (FML's private meme head)."""
    sends_model: bool = True
    """Whether clients send arrays at all (local-only does not)."""

    def personal_arch(self, cfg: FMLConfig, partition_id: int) -> str | None:
        """Architecture of the model a client keeps (None: it keeps none)."""
        if self.keeps == "own":
            return cfg.model.local_per_client.get(partition_id, cfg.model.local)
        return cfg.model.meme if self.keeps == "global" else None

    def central_evaluation(self, cfg: FMLConfig, meme: nn.Module) -> bool:
        """Whether the server can evaluate its model on the central test set."""
        return self.has_global_model and not self.private_keys(cfg, meme)


def pattern_keys(cfg: FMLConfig, meme: nn.Module) -> list[str]:
    """The meme keys matched by ``model.private_patterns``."""
    return matching_keys(meme, cfg.model.private_patterns)
