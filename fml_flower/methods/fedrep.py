"""FedRep (Collins et al. 2021): a shared representation (body), a private head per client.

Per round, the head trains first with the body frozen, then the body with the head frozen;
only the body is averaged.

- trains: ``train.local_epochs`` epochs of the head (body frozen), then as many of the
  body (head frozen), each phase with a fresh SGD optimizer over its own parameters;
- sends: the body; keeps: the whole model (its head is what matters);
- evaluates: today's body with its own head;
- served by :class:`strategies.FedPer` (the body is averaged, the head never sent).
"""

from __future__ import annotations

from torch import nn

from fml_flower.methods import fedper
from fml_flower.methods.base import ClientRound, Method, Update
from fml_flower.training import EpochStats, sgd, supervised_step


def _only_trainable(model: nn.Module, keys: set[str]) -> list[nn.Parameter]:
    """Freeze every parameter but those named in ``keys``; return the trainable ones."""
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in keys)
        if name in keys:
            trainable.append(p)
    return trainable


def train(r: ClientRound) -> Update:
    """The head with the body frozen, then the body with the head frozen."""
    model, head = fedper.body_with_own_head(r)
    names = {n for n, _ in model.named_parameters()}
    gen, stats = r.generator(), EpochStats()
    s = r.settings
    for keys in (set(head) & names, names - set(head)):  # head first, then body
        params = _only_trainable(model, keys)
        opt = sgd(params, s.lr, s.momentum, s.weight_decay)
        r.train_with(supervised_step(model, opt, compute=r.compute), gen, stats)
    for p in model.parameters():
        p.requires_grad_(True)
    r.keep(model, None, r.cfg.model.meme)  # both phases start with fresh optimizers
    return fedper._body(model, head), stats.means()


METHOD = Method(
    name="fedrep",
    description="head first (body frozen), then body (head frozen); sends the body",
    train=train,
    evaluate=fedper.evaluate,
    strategy="strategies.baselines:FedPer",
    keeps="global",
    has_global_model=False,
    private_keys=fedper.head_of,
)
