"""The server side of each method: its strategy and whether it has a global model."""

from __future__ import annotations

import math

from fml_flower.config import FMLConfig
from fml_flower.schedule import round_settings
from strategies.baselines import Ditto, FedAvgBaseline, FedPer, FedProx, LocalOnly
from strategies.fml import FedMutualLearning
from strategies.robust import RobustFedAvg


def make_strategy(cfg: FMLConfig, private_keys: list[str], round_offset: int = 0) -> RobustFedAvg:
    """The strategy of ``train.method``, with this configuration's federation settings.

    ``private_keys`` are the global model's head keys (FedPer keeps them on clients);
    ``round_offset`` is the number of rounds done before (a resumed run): the learning-rate
    and alpha/beta schedules continue from there.
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
    )
    if t.method == "fml":
        return FedMutualLearning(alpha=t.alpha, beta=t.beta, **common)
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
model has no head, local-only has none)."""
