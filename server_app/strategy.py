"""The configured method's strategy, built through its public constructor."""

from __future__ import annotations

import importlib
import math

from flwr.serverapp.strategy import Strategy
from torch import nn

from fml_flower.config import FMLConfig, weighting_of
from fml_flower.methods import Method
from fml_flower.schedule import lr_schedule
from strategies.aggregators import make_aggregator
from strategies.privacy import differential_privacy
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
        evaluate_in_train=f.evaluation == "in-train",
        evaluate_every=f.evaluate_every,
        node_wait=f.node_wait,
        round_offset=round_offset,
        aggregator=make_aggregator(
            cfg.aggregation.rule,
            cfg.aggregation.trim_fraction,
            cfg.aggregation.num_malicious,
            cfg.aggregation.num_selected,
        ),
        weighting=weighting_of(cfg),
    )
    private = method.private_keys(cfg, meme)
    if private:
        options["private_keys"] = private
    options.update(method.strategy_options(cfg))
    return strategy_class(method)(**options)


def make_private(
    cfg: FMLConfig, strategy: RobustFedAvg, num_nodes: int, prior_releases: int = 0
) -> Strategy:
    """``strategy`` wrapped for ``privacy.mode`` (itself when the mode is ``none``).

    Every one of the ``num_nodes`` connected nodes is in the population; the round's
    sample size is the strategy's. ``prior_releases`` are the rounds a resumed run had
    released (the accountant continues from them).
    """
    p = cfg.privacy
    if p.mode == "none":
        return strategy
    return differential_privacy(
        strategy,
        mode=p.mode,
        noise_multiplier=p.noise_multiplier,
        clipping_norm=p.clipping_norm,
        num_sampled_clients=strategy.train_sample_size(num_nodes),
        population_size=num_nodes,
        delta=p.delta,
        max_epsilon=p.max_epsilon or None,
        target_quantile=p.target_quantile,
        clip_norm_lr=p.clip_norm_lr,
        clipped_count_stddev=p.clipped_count_stddev or None,
        prior_releases=prior_releases,
    )
