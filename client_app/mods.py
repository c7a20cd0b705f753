"""Mods of the project's ClientApp train handler, chosen by the run's configuration.

- :func:`privacy_mod`: the client half of ``privacy.mode``: Flower's own
  ``fixedclipping_mod`` (``client-fixed``) or ``adaptiveclipping_mod``
  (``client-adaptive``), which clip the reply's update to the norm the server's wrapper
  sends; other modes pass the message through. Only the reply's ArrayRecord (the meme,
  or a baseline's model) is touched: the personalized model is trained and kept exactly as
  without privacy.
- :func:`attack_mod`: robustness experiments: the clients listed in ``attack.clients``
  send a poisoned update (:mod:`fml_flower.attacks`); their own models are untouched.

Each message's configuration is the run's (``context.run_config``), parsed once per
process (:func:`run_config_of`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from fml_flower.attacks import poison
from fml_flower.config import (
    SENT_CONFIG_KEY,
    FMLConfig,
    config_from_run_config,
    config_from_yaml,
)


@lru_cache(maxsize=4)
def _config(run_config_items: tuple[tuple[str, object], ...]) -> FMLConfig:
    return config_from_run_config(dict(run_config_items))


@lru_cache(maxsize=4)
def _sent_config(text: str) -> FMLConfig:
    return config_from_yaml(text)


def run_config_of(context: Context, msg: Message | None = None) -> FMLConfig:
    """The run's validated configuration (cached per process): the one the server sent in
    ``msg``'s ConfigRecord (:data:`~fml_flower.config.SENT_CONFIG_KEY`), else the one the
    run-config gives.
    """
    if msg is not None and "config" in msg.content.config_records:
        sent = msg.content["config"].get(SENT_CONFIG_KEY)  # type: ignore[union-attr]
        if isinstance(sent, bytes):
            sent = sent.decode()
        if isinstance(sent, str) and sent:
            return _sent_config(sent)
    return _config(tuple(sorted(context.run_config.items())))


def privacy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's client-side clipping mod for ``privacy.mode``, or nothing."""
    mode = run_config_of(context, msg).privacy.mode
    if mode == "client-fixed":
        return fixedclipping_mod(msg, context, call_next)
    if mode == "client-adaptive":
        return adaptiveclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def attack_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """An attacking client (``attack.clients``) replaces its reply's arrays."""
    reply = call_next(msg, context)
    attack = run_config_of(context, msg).attack
    pid = context.node_config.get("partition-id")
    if attack.kind == "none" or pid is None or int(pid) not in attack.clients:  # type: ignore[arg-type]
        return reply
    if reply.has_error() or list(reply.content.array_records) != ["arrays"]:
        return reply
    sent = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    received = {k: v.numpy() for k, v in msg.content["arrays"].items()}  # type: ignore[union-attr]
    round_ = int(msg.content["config"].get("round", 0))  # type: ignore[union-attr, arg-type]
    rng = np.random.default_rng([run_config_of(context, msg).seed, int(pid), round_])  # type: ignore[arg-type]
    poisoned = poison(sent, received, attack.kind, attack.scale, rng)
    reply.content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in poisoned.items()})
    return reply
