"""The methods: FML and the baselines, each one module, all in one registry.

Adding a method is one module defining a :class:`~fml_flower.methods.base.Method` and one
line here. The ClientApp and the ServerApp look the configured method up in
:data:`METHODS` once; nothing else compares method names.
"""

from __future__ import annotations

from fml_flower.methods import ditto, fedavg, fedper, fedprox, fedrep, fml, local
from fml_flower.methods.base import ClientRound, Method

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        fml.METHOD,
        fedavg.METHOD,
        fedprox.METHOD,
        ditto.METHOD,
        fedper.METHOD,
        fedrep.METHOD,
        local.METHOD,
    )
}


def get_method(name: str) -> Method:
    """The method called ``name``; ``KeyError`` naming the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method '{name}'; known: {sorted(METHODS)}") from None


__all__ = ["METHODS", "ClientRound", "Method", "get_method"]
