"""Ditto (Li et al. 2021): a global model by FedAvg, a personal model pulled towards it.

- trains: the received global model (cross-entropy), then its personal model with
  ``lambda/2 ||v - w_global||^2`` towards the received weights (``ditto-lambda``);
- sends: the global model; keeps: the personal model (global architecture, started from
  the global weights);
- evaluates: the global model and the personal model;
- served by :class:`strategies.Ditto` (``train.ditto_lambda``).
"""

from __future__ import annotations

from typing import Any

from fml_flower.config import FMLConfig
from fml_flower.methods.base import ClientRound, Method, Update, as_meme_columns
from fml_flower.training import supervised_step


def train(r: ClientRound) -> Update:
    """The global model as in FedAvg, then the personal model towards the received one."""
    model = r.global_model()
    anchor = [p.detach().clone() for p in model.parameters()]
    opt = r.optimizer(model)
    arch = r.cfg.model.meme
    personal, opt_personal = r.personal_model(arch, init_from_global=True)
    lam = float(r.settings.extra["ditto-lambda"])
    gen = r.generator()  # one batch order stream for both phases
    g_stats = r.train_with(supervised_step(model, opt, compute=r.compute), gen)
    p_stats = r.train_with(supervised_step(personal, opt_personal, lam, anchor, r.compute), gen)
    r.keep(personal, opt_personal, arch)
    return r.shared_part(model), {**p_stats.means(), **as_meme_columns(g_stats)}


def evaluate(r: ClientRound) -> dict[str, float]:
    """The global model and the personal model on the client's test part."""
    out = r.scores("global", r.global_model())
    personal = r.saved_personal(r.cfg.model.meme)
    if personal is not None:
        out.update(r.scores("personal", personal))
    return out


def strategy_options(cfg: FMLConfig) -> dict[str, Any]:
    """Ditto's lambda."""
    return {"ditto_lambda": cfg.train.ditto_lambda}


METHOD = Method(
    name="ditto",
    description="the global model, then its personal model + lambda/2 ||v - w_global||^2",
    train=train,
    evaluate=evaluate,
    strategy="strategies.baselines:Ditto",
    keeps="global",
    has_global_model=True,
    strategy_options=strategy_options,
)
