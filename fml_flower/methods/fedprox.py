"""FedProx (Li et al. 2020): FedAvg whose clients add ``mu/2 ||w - w_global||^2``.

- trains: the global model with the proximal term (``proximal-mu`` sent by the strategy);
- sends: the model; keeps: nothing; evaluates: the global model;
- served by :class:`strategies.FedProx` (``train.proximal_mu``).
"""

from __future__ import annotations

from typing import Any

from fml_flower.config import FMLConfig
from fml_flower.methods import fedavg
from fml_flower.methods.base import Method


def strategy_options(cfg: FMLConfig) -> dict[str, Any]:
    """FedProx's mu."""
    return {"proximal_mu": cfg.train.proximal_mu}


METHOD = Method(
    name="fedprox",
    description="the global model + mu/2 ||w - w_global||^2; sends the model",
    train=fedavg.train,  # the proximal term comes with the strategy's proximal-mu
    evaluate=fedavg.evaluate,
    strategy="strategies.baselines:FedProx",
    keeps="nothing",
    has_global_model=True,
    strategy_options=strategy_options,
)
