"""What a client trains with in one round, as the server sends it: one definition for both sides.

The strategy (:class:`strategies.RobustFedAvg` and its subclasses) writes these values into
every training ``ConfigRecord`` under the keys of :data:`CONFIG_KEYS`; the client reads them
back with :meth:`RoundSettings.from_config`, which applies the same checks the strategy's
constructor applies. Plain Python, no Flower import.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

DISTILLATIONS = ("faithful", "pfllib")
"""FML's two losses (``fml_flower.training.DISTILLATIONS`` documents them)."""

Schedule = float | Callable[[int], float]
"""A constant, or a function of the (absolute, 1-based) round number."""

CONFIG_KEYS = {
    "lr": "lr",
    "local_epochs": "local-epochs",
    "batch_size": "batch-size",
    "momentum": "momentum",
    "weight_decay": "weight-decay",
    "round": "round",
    "alpha": "alpha",
    "beta": "beta",
    "distillation": "distillation",
}
"""Field of :class:`RoundSettings` -> key in the training ConfigRecord. ``alpha``,
``beta`` and ``distillation`` are sent by FML's strategy only; ``round`` is the absolute
round (it continues after a resume, where Flower's ``server-round`` restarts at 1)."""


def value_at(schedule: Schedule, server_round: int) -> float:
    """The value of ``schedule`` in ``server_round``."""
    return float(schedule(server_round) if callable(schedule) else schedule)


def check_range(name: str, value: float, low: float, high: float | None = None) -> float:
    """``value`` as a float within ``[low, high]`` (``high=None``: no upper bound), else a
    ``ValueError`` naming ``name``.
    """
    value = float(value)
    if value != value or value < low or (high is not None and value > high):  # NaN fails
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_positive_int(name: str, value: object) -> int:
    """``value`` as an int >= 1, else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class RoundSettings:
    """The client-training settings of one round."""

    lr: float
    local_epochs: int = 1
    batch_size: int = 32
    momentum: float = 0.0
    weight_decay: float = 0.0
    round: int = 1
    alpha: float | None = None
    """FML: weight of the labels in the personalized model's loss (None: not FML)."""
    beta: float | None = None
    """FML: weight of the labels in the meme's loss."""
    distillation: str | None = None
    """FML: the mutual-learning loss, ``faithful`` or ``pfllib`` (None: not sent, which a
    client reads as ``faithful``)."""
    extra: dict[str, float | int | str | bool] = field(default_factory=dict)
    """Method-specific values (e.g. FedProx's ``proximal-mu``), by their config key."""

    def __post_init__(self) -> None:
        check_range("lr", self.lr, 0.0)
        if self.lr == 0:
            raise ValueError("lr must be > 0, got 0.0")
        check_positive_int("local_epochs", self.local_epochs)
        check_positive_int("batch_size", self.batch_size)
        check_range("momentum", self.momentum, 0.0, 1.0)
        if self.momentum >= 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        check_range("weight_decay", self.weight_decay, 0.0)
        check_positive_int("round", self.round)
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if value is not None:
                check_range(name, value, 0.0, 1.0)
        if self.distillation is not None and self.distillation not in DISTILLATIONS:
            raise ValueError(
                f"distillation must be one of {DISTILLATIONS}, got {self.distillation!r}"
            )

    def to_config(self) -> dict[str, float | int | str | bool]:
        """The values as ConfigRecord entries (keys of :data:`CONFIG_KEYS`)."""
        out: dict[str, float | int | str | bool] = {}
        for name, key in CONFIG_KEYS.items():
            value = getattr(self, name)
            if value is not None:
                out[key] = value
        out.update(self.extra)
        return out

    @classmethod
    def for_evaluation(cls, config: Mapping[str, object]) -> RoundSettings:
        """Settings of an evaluation message, which trains nothing: only its round counts."""
        return cls(lr=1.0, round=int(config.get("round", config.get("server-round", 1))))  # type: ignore[arg-type]

    @classmethod
    def from_config(cls, config: Mapping[str, object], fml: bool = False) -> RoundSettings:
        """Read the settings a strategy sent; ``fml=True`` also requires ``alpha``/``beta``.

        Raises ``ValueError`` naming a missing key (the strategy is not one of this
        library's, or an old version) or a value out of range.
        """
        required = ["lr", "local_epochs", "batch_size"] + (["alpha", "beta"] if fml else [])
        missing = [CONFIG_KEYS[n] for n in required if CONFIG_KEYS[n] not in config]
        if missing:
            raise ValueError(
                f"the training config lacks {missing} (got keys {sorted(config)}); the "
                "server must use fml-flower's strategies (e.g. FedMutualLearning), which "
                "send them every round"
            )
        known = set(CONFIG_KEYS.values()) | {"server-round"}
        server_round = config.get("server-round", 1)
        return cls(
            lr=float(config["lr"]),  # type: ignore[arg-type]
            local_epochs=config["local-epochs"],  # type: ignore[arg-type]
            batch_size=config["batch-size"],  # type: ignore[arg-type]
            momentum=float(config.get("momentum", 0.0)),  # type: ignore[arg-type]
            weight_decay=float(config.get("weight-decay", 0.0)),  # type: ignore[arg-type]
            round=int(config.get("round", server_round)),  # type: ignore[arg-type]
            alpha=float(config["alpha"]) if "alpha" in config else None,  # type: ignore[arg-type]
            beta=float(config["beta"]) if "beta" in config else None,  # type: ignore[arg-type]
            distillation=str(config["distillation"]) if "distillation" in config else None,
            extra={k: v for k, v in config.items() if k not in known},  # type: ignore[misc]
        )
