"""Federated Mutual Learning (Shen et al. 2020): the domain core, plain PyTorch."""

__version__ = "0.1.0"
