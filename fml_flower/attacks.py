"""Poisoned updates for robustness experiments (plain NumPy): what an attacking client
sends instead of its honest arrays.

- ``scale``: ``received + scale * (sent - received)``; ``scale = -10`` pushes the global
  model ten times as far the other way as the client's honest update would pull it;
- ``random``: every floating array replaced by Gaussian noise of that array's own
  standard deviation (random weights of the right shape and scale).

Integer arrays (BatchNorm's ``num_batches_tracked``) are sent unchanged.
"""

from __future__ import annotations

import numpy as np

Arrays = dict[str, np.ndarray]


def poison(
    sent: Arrays, received: Arrays, kind: str, scale: float, rng: np.random.Generator
) -> Arrays:
    """The poisoned version of ``sent`` (the honest reply to ``received``)."""
    if kind not in ("scale", "random"):
        raise ValueError(f"unknown attack kind '{kind}' (scale or random)")
    out: Arrays = {}
    for key, honest in sent.items():
        if not np.issubdtype(honest.dtype, np.floating):
            out[key] = honest
            continue
        if kind == "scale":
            base = received[key].astype(np.float64)
            value = base + scale * (honest.astype(np.float64) - base)
        else:
            std = float(honest.std()) or 1.0
            value = rng.normal(0.0, std, honest.shape)
        out[key] = value.astype(honest.dtype)
    return out
