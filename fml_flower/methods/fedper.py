"""FedPer (Arivazhagan et al. 2019): a shared body, a private head per client.

- trains: the received body with its own head, jointly (cross-entropy; a fresh optimizer
  every round, as the body is replaced by the global one);
- sends: the body only; keeps: the whole model (its head is what matters);
- evaluates: today's body with its own head;
- served by :class:`strategies.FedPer` (the head: the last linear layer).
"""

from __future__ import annotations

from torch import nn

from fml_flower.config import FMLConfig
from fml_flower.methods.base import ClientRound, Method, Update, load_body
from fml_flower.models import head_keys
from fml_flower.training import supervised_step


def body_with_own_head(r: ClientRound) -> tuple[nn.Module, list[str]]:
    """The client's model with the received body loaded, and the head's keys."""
    model, _ = r.personal_model(r.cfg.model.meme, keep_optimizer_state=False)
    load_body(model, r.received)
    return model, head_keys(model)


def train(r: ClientRound) -> Update:
    """The received body with this client's own head; only the body goes back."""
    model, head = body_with_own_head(r)
    opt = r.optimizer(model)
    stats = r.train(supervised_step(model, opt, compute=r.compute))
    r.keep(model, opt, r.cfg.model.meme)
    return _body(model, head), stats.means()


def _body(model: nn.Module, head: list[str]) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in head}


def evaluate(r: ClientRound) -> dict[str, float]:
    """Today's body with the client's own head (once it has one)."""
    if r.saved_personal(r.cfg.model.meme) is None:
        return {}
    model, _ = body_with_own_head(r)
    return r.scores("personal", model)


def head_of(cfg: FMLConfig, meme: nn.Module) -> list[str]:
    """The private head: the last linear layer."""
    return head_keys(meme)


METHOD = Method(
    name="fedper",
    description="body (shared) + its own head (the last linear layer); sends the body",
    train=train,
    evaluate=evaluate,
    strategy="strategies.baselines:FedPer",
    keeps="global",
    has_global_model=False,
    private_keys=head_of,
)
