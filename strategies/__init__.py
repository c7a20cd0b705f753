"""Flower strategies: Federated Mutual Learning and baselines."""

from strategies.fml import FedMutualLearning, RoundLog

__all__ = ["FedMutualLearning", "RoundLog"]
