"""The configured method's strategy, built through its public constructor."""

from __future__ import annotations

import importlib
import math

from torch import nn

from fml_flower.config import FMLConfig
from fml_flower.methods import Method
from fml_flower.schedule import lr_schedule
from strategies.robust import Participation, RobustFedAvg


def strategy_class(method: Method) -> type[RobustFedAvg]:
    """The class named by ``method.strategy`` (``module:Class``)."""
    module, _, name = method.strategy.partition(":")
    return getattr(importlib.import_module(module), name)


def make_strategy(
    cfg: FMLConfig,
    method: Method,
    meme: nn.Module,
    round_offset: int = 0,
    participation: Participation | None = None,
) -> RobustFedAvg:
    """``method``'s strategy with this configuration's training and federation settings.

    ``round_offset`` is the number of rounds done before (a resumed run): the learning-rate
    and alpha/beta schedules continue from there; ``participation`` restricts sampling to
    the nodes that have joined (new participants).
    """
    f, t = cfg.federation, cfg.train
    options = dict(
        lr=lr_schedule(t),
        local_epochs=t.local_epochs,
        batch_size=t.batch_size,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
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
        participation=participation,
        node_wait=f.node_wait,
        round_offset=round_offset,
    )
    private = method.private_keys(cfg, meme)
    if private:
        options["private_keys"] = private
    options.update(method.strategy_options(cfg))
    return strategy_class(method)(**options)
