"""The server side of each method: its strategy and whether it has a global model."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from torch import nn

from fml_flower.config import FMLConfig
from fml_flower.models import head_keys, matching_keys
from fml_flower.schedule import round_settings
from strategies.baselines import Ditto, FedAvgBaseline, FedPer, FedProx, LocalOnly
from strategies.fml import FedMutualLearning
from strategies.robust import RobustFedAvg


def make_strategy(
    cfg: FMLConfig,
    private_keys: list[str],
    round_offset: int = 0,
    join_rounds_fn: Callable[[list[int]], Mapping[int, int]] | None = None,
) -> RobustFedAvg:
    """The strategy of ``train.method``, with this configuration's federation settings.

    ``private_keys`` are the meme keys that stay on clients: FedPer's head, or FML's
    ``model.private_patterns`` matches;
    ``round_offset`` is the number of rounds done before (a resumed run): the learning-rate
    and alpha/beta schedules continue from there;
    ``join_rounds_fn``: connected node ids -> first round (of this run) in which each
    takes part (new participants).
    """
    f, t = cfg.federation, cfg.train

    def round_config(server_round: int) -> dict[str, float | int | str | bool]:
        absolute = server_round + round_offset
        s = round_settings(t, absolute)
        return {"lr": s.lr, "alpha": s.alpha, "beta": s.beta, "round": absolute}

    common: dict = dict(
        round_config_fn=round_config,
        fraction_train=f.fraction_train,
        fraction_evaluate=f.fraction_evaluate,
        # Flower samples max(int(N * fraction), min_*_nodes): derive the minimums from the
        # fractions so that fraction_train < 1 really samples a fraction of the nodes.
        min_train_nodes=max(1, math.ceil(f.fraction_train * f.min_nodes)),
        min_evaluate_nodes=max(1, math.ceil(f.fraction_evaluate * f.min_nodes))
        if f.fraction_evaluate > 0
        else 0,
        min_available_nodes=f.min_nodes,
        min_replies=f.min_replies,
        join_rounds_fn=join_rounds_fn,
    )
    if t.method == "fml":
        return FedMutualLearning(alpha=t.alpha, beta=t.beta, private_keys=private_keys, **common)
    if t.method == "fedavg":
        return FedAvgBaseline(**common)
    if t.method == "fedprox":
        return FedProx(proximal_mu=t.proximal_mu, **common)
    if t.method == "ditto":
        return Ditto(ditto_lambda=t.ditto_lambda, **common)
    if t.method == "fedper":
        return FedPer(private_keys=private_keys, **common)
    if t.method == "local":
        return LocalOnly(**common)
    raise ValueError(f"train.method: unknown '{t.method}'")


HAS_GLOBAL_MODEL = ("fml", "fedavg", "fedprox", "ditto")
"""Methods whose server holds a complete model to evaluate centrally (FedPer's global
model has no head, local-only has none), unless FML keeps a private meme head."""


def private_keys_of(cfg: FMLConfig, meme: nn.Module) -> list[str]:
    """The meme keys that never leave the clients under this configuration."""
    if cfg.train.method == "fedper":
        return head_keys(meme)
    if cfg.train.method == "fml":
        return matching_keys(meme, cfg.model.private_patterns)
    return []


def has_complete_global_model(cfg: FMLConfig) -> bool:
    """Whether the server can evaluate the global model on the central test set."""
    return cfg.train.method in HAS_GLOBAL_MODEL and not (
        cfg.train.method == "fml" and cfg.model.private_patterns
    )
