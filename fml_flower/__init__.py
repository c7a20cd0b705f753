"""Federated Mutual Learning (Shen et al. 2020): the domain core, plain PyTorch."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fml-flower")  # the one place is pyproject.toml
except PackageNotFoundError:  # running from a source tree or app bundle that is not installed
    __version__ = "unknown"
