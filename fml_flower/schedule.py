"""Per-round values of the learning rate and of alpha/beta ("dynamic balancing").

The learning rate is multiplied by ``lr_decay_gamma`` every ``lr_decay_every`` rounds.
The rounds between two decays form a *stage*; an alpha/beta schedule gives one value per
stage (the last value is kept once the list runs out), as in the FML authors' dynamic
schedule beta 0.1 -> 0.5 -> 0.9 tied to the learning-rate decay.
"""

from __future__ import annotations

from collections.abc import Callable

from fml_flower.config import TrainConfig


def stage(server_round: int, decay_every: int) -> int:
    """Number of learning-rate decays applied before ``server_round`` (1-based)."""
    return (server_round - 1) // decay_every if decay_every > 0 else 0


def step_decay(lr: float, every: int, gamma: float = 0.1) -> Callable[[int], float]:
    """A learning rate for ``FedMutualLearning(lr=...)``: ``lr`` multiplied by ``gamma``
    every ``every`` rounds (round 1 uses ``lr``).
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    return lambda r: lr * gamma ** stage(r, every)


def lr_schedule(train: TrainConfig) -> float | Callable[[int], float]:
    """``train.lr``, decayed by ``lr_decay_gamma`` every ``lr_decay_every`` rounds."""
    if train.lr_decay_every <= 0:
        return train.lr
    return step_decay(train.lr, train.lr_decay_every, train.lr_decay_gamma)


def stage_schedule(
    values: list[float], constant: float, decay_every: int
) -> float | Callable[[int], float]:
    """``constant``, or one value of ``values`` per learning-rate stage (the last kept)."""
    if not values:
        return constant
    values = list(values)
    return lambda r: values[min(stage(r, decay_every), len(values) - 1)]
