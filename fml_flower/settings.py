"""What a client trains with in one round, as the server sends it: one definition for both sides.

The strategy (:class:`strategies.RobustFedAvg` and its subclasses) writes these values into
every training ``ConfigRecord`` under the keys of :data:`CONFIG_KEYS`; the client reads them
back with :meth:`RoundSettings.from_config`, which applies the same checks the strategy's
constructor applies. Plain Python, no Flower import.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

DISTILLATIONS = ("faithful", "pfllib")
"""FML's two losses (``fml_flower.training.DISTILLATIONS`` documents them)."""

Schedule = float | Callable[[int], float] | Sequence[float]
"""A constant, a function of the (absolute, 1-based) round number, or one value per round
(a list or tuple: the first for round 1)."""


class PerRound:
    """A list of values, one per round (round 1 first), used as a schedule."""

    def __init__(self, name: str, values: Sequence[float]) -> None:
        if not values:
            raise ValueError(f"{name}: an empty list gives no value for round 1")
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int | float)]
        if bad:
            raise TypeError(
                f"{name}: every value of the per-round list must be a number, got {bad}"
            )
        self.name = name
        self.values = [float(v) for v in values]

    def __call__(self, server_round: int) -> float:
        """The value of ``server_round`` (1-based)."""
        if not 1 <= server_round <= len(self.values):
            raise ValueError(
                f"{self.name}: the per-round list has {len(self.values)} values, no value "
                f"for round {server_round}"
            )
        return self.values[server_round - 1]

    def __repr__(self) -> str:
        return f"per round {self.values}"


def as_schedule(name: str, value: object) -> float | Callable[[int], float]:
    """``value`` as a schedule: a number, a callable of the round, or a list/tuple of one
    value per round (:class:`PerRound`); anything else is a ``TypeError`` naming ``name``.
    """
    if isinstance(value, list | tuple):
        return PerRound(name, value)
    if callable(value):
        return value  # type: ignore[return-value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{name} must be a number, a function of the round, or a list with one value per "
            f"round; got {type(value).__name__} {value!r}"
        )
    return float(value)


def check_schedule_length(name: str, schedule: object, last_round: int) -> None:
    """Refuse a per-round list shorter than the run (``last_round``), before round 1."""
    if isinstance(schedule, PerRound) and len(schedule.values) < last_round:
        raise ValueError(
            f"{name}: the per-round list has {len(schedule.values)} values but the run has "
            f"{last_round} rounds; give one value per round"
        )


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
    if isinstance(schedule, list | tuple):
        schedule = PerRound("schedule", schedule)
    return float(schedule(server_round) if callable(schedule) else schedule)  # type: ignore[arg-type]


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
