"""Local-only: every client trains its own model alone; no model crosses the network.

- trains: its own model (any architecture; momentum carried over); sends: nothing;
- keeps: its model; evaluates: its model;
- served by :class:`strategies.LocalOnly` (empty records both ways).
"""

from __future__ import annotations

from fml_flower.methods.base import ClientRound, Method, Update
from fml_flower.training import supervised_step


def train(r: ClientRound) -> Update:
    """The client's own model on its own data; nothing is sent back but metrics."""
    model, opt = r.personal_model(r.local_arch)
    stats = r.train(supervised_step(model, opt, compute=r.compute))
    r.keep(model, opt, r.local_arch)
    return None, stats.means()


def evaluate(r: ClientRound) -> dict[str, float]:
    """The client's own model."""
    model = r.saved_personal(r.local_arch)
    return {} if model is None else r.scores("personal", model)


METHOD = Method(
    name="local",
    description="its own model, alone; sends nothing",
    train=train,
    evaluate=evaluate,
    strategy="strategies.baselines:LocalOnly",
    keeps="own",
    has_global_model=False,
    sends_model=False,
)
