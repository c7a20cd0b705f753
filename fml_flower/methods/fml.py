"""FML (Shen et al. 2020): a private personalized model and a meme that learn from each other.

- trains: the personalized model (restored, its optimizer's momentum carried over) and a
  meme forked from the global model with a fresh optimizer, by deep mutual learning;
- sends: the meme (parameters and buffers; without its private keys, if any);
- keeps: the personalized model (any architecture) and the meme's private part;
- evaluates: the global model and the personalized model on the client's test part;
- served by :class:`strategies.FedMutualLearning`.
"""

from __future__ import annotations

from typing import Any

from fml_flower.config import FMLConfig
from fml_flower.methods.base import ClientRound, Method, Update, pattern_keys
from fml_flower.schedule import stage_schedule
from fml_flower.training import mutual_step


def train(r: ClientRound) -> Update:
    """Deep mutual learning of the personalized model and a fresh meme."""
    meme = r.global_model()
    opt_meme = r.optimizer(meme)  # a new optimizer every round: fresh momentum
    local, opt_local = r.personal_model(r.local_arch)
    s = r.settings
    if s.alpha is None or s.beta is None:
        raise ValueError("FML needs 'alpha' and 'beta' in the training config")
    step = mutual_step(
        local,
        meme,
        opt_local,
        opt_meme,
        s.alpha,
        s.beta,
        r.cfg.train.update,
        s.distillation or "faithful",
        r.compute,
    )
    stats = r.train(step)
    r.keep(local, opt_local, r.local_arch)
    return r.shared_part(meme), stats.means()


def evaluate(r: ClientRound) -> dict[str, float]:
    """The received global model (with this client's private meme part) and the
    personalized model on the client's own test part.
    """
    out = r.scores("global", r.global_model())
    personal = r.saved_personal(r.local_arch)
    if personal is not None:
        out.update(r.scores("personal", personal))
    return out


def strategy_options(cfg: FMLConfig) -> dict[str, Any]:
    """``alpha`` and ``beta`` (constants, or per-round schedules tied to the lr decay) and
    the ``distillation`` loss.
    """
    t = cfg.train
    return {
        "alpha": stage_schedule(t.alpha_schedule, t.alpha, t.lr_decay_every),
        "beta": stage_schedule(t.beta_schedule, t.beta, t.lr_decay_every),
        "distillation": t.distillation,
    }


METHOD = Method(
    name="fml",
    description="its private model and a meme by mutual learning; sends the meme",
    train=train,
    evaluate=evaluate,
    strategy="strategies.fml:FedMutualLearning",
    keeps="own",
    has_global_model=True,
    private_keys=pattern_keys,
    strategy_options=strategy_options,
    supports_private_patterns=True,
)
