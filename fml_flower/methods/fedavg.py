"""FedAvg (McMahan et al. 2017): every client trains the global model by cross-entropy.

- trains: the received global model; sends: it; keeps: nothing;
- evaluates: the global model (which is also what its clients use);
- served by :class:`strategies.FedAvgBaseline`.
"""

from __future__ import annotations

from fml_flower.methods.base import ClientRound, Method, Update, as_meme_columns
from fml_flower.training import supervised_step


def train(r: ClientRound) -> Update:
    """Cross-entropy training of the global model (plus FedProx's term if sent)."""
    model = r.global_model()
    opt = r.optimizer(model)
    mu = float(r.settings.extra.get("proximal-mu", 0.0))
    anchor = [p.detach().clone() for p in model.parameters()]
    stats = r.train(supervised_step(model, opt, proximal_mu=mu, anchor=anchor, compute=r.compute))
    return r.shared_part(model), as_meme_columns(stats)


def evaluate(r: ClientRound) -> dict[str, float]:
    """The global model, which is also each client's model."""
    out = r.scores("global", r.global_model())
    out.update(personal_acc=out["global_acc"], personal_loss=out["global_loss"])
    return out


METHOD = Method(
    name="fedavg",
    description="the global model (cross-entropy); sends the model",
    train=train,
    evaluate=evaluate,
    strategy="strategies.baselines:FedAvgBaseline",
    keeps="nothing",
    has_global_model=True,
)
