"""Flower strategies: Federated Mutual Learning and baselines, all robust to bad replies."""

from strategies.baselines import Ditto, FedAvgBaseline, FedPer, FedProx, LocalOnly
from strategies.fml import FedMutualLearning
from strategies.robust import RobustFedAvg, RoundLog

__all__ = [
    "Ditto",
    "FedAvgBaseline",
    "FedMutualLearning",
    "FedPer",
    "FedProx",
    "LocalOnly",
    "RobustFedAvg",
    "RoundLog",
]
