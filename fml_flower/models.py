"""Model zoo: the paper's small models by name, plus any torchvision classifier.

Every builder takes the input shape ``(channels, height, width)`` and the number of
classes, so the same name works for 1x28x28 MNIST and 3x32x32 CIFAR-10.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

import torch
from torch import nn

# torchvision is imported where a torchvision model is asked for: it costs about a second
# of start-up, paid by every ClientApp process in deployment (one per message).

InputShape = tuple[int, int, int]
ModelFactory = Callable[[InputShape, int], nn.Module]


def _flat_features(features: nn.Module, input_shape: InputShape) -> int:
    """Number of features ``features`` produces for one input of ``input_shape``."""
    with torch.no_grad():
        return int(features(torch.zeros(1, *input_shape)).flatten(1).shape[1])


class MLP(nn.Module):
    """Two hidden layers of 200 units (McMahan et al. 2017, the FML authors' MLP)."""

    def __init__(self, input_shape: InputShape, num_classes: int, hidden: int = 200):
        super().__init__()
        c, h, w = input_shape
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * h * w, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits."""
        return self.net(x)


class LeNet5(nn.Module):
    """LeNet-5 (conv 6 -> pool -> conv 16 -> pool -> fc 120 -> fc 84).

    Inputs smaller than 32x32 are zero-padded in the first convolution so that a 28x28
    digit sees the classic 32x32 geometry.
    """

    def __init__(self, input_shape: InputShape, num_classes: int):
        super().__init__()
        c, h, _ = input_shape
        pad = 2 if h < 32 else 0
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(_flat_features(self.features, input_shape), 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits."""
        return self.classifier(self.features(x))


class CNN(nn.Module):
    """The CNN of McMahan et al. 2017: conv5x5 32, pool, conv5x5 64, pool, fc 512.

    ``padding=2`` (``cnn``, the "same" convolutions of TensorFlow Federated's version: 1.66 M
    parameters on MNIST) or ``padding=0`` (``cnn-unpadded``, the layout of many PyTorch FL
    libraries: 0.58 M parameters, about a third of the multiply-adds).
    """

    def __init__(self, input_shape: InputShape, num_classes: int, padding: int = 2):
        super().__init__()
        c = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 5, padding=padding),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=padding),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(_flat_features(self.features, input_shape), 512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits."""
        return self.classifier(self.features(x))


class _ToThreeChannels(nn.Module):
    """Repeat a single-channel image to three channels (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1)


def resnet18_cifar(input_shape: InputShape, num_classes: int) -> nn.Module:
    """Torchvision's ResNet-18 with the CIFAR stem: 3x3 stride-1 conv, no max-pool."""
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(input_shape[0], 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def torchvision_model(name: str) -> ModelFactory:
    """Factory for any torchvision classification model, trained from scratch."""

    def build(input_shape: InputShape, num_classes: int) -> nn.Module:
        import torchvision

        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        if input_shape[0] == 1:
            return nn.Sequential(_ToThreeChannels(), model)
        return model

    return build


BUILTIN_MODELS: dict[str, ModelFactory] = {
    "mlp": MLP,
    "lenet5": LeNet5,
    "cnn": CNN,
    "resnet18": resnet18_cifar,
    "cnn-unpadded": lambda input_shape, num_classes: CNN(input_shape, num_classes, padding=0),
}


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`: built-ins first, then torchvision's."""
    import torchvision

    tv = sorted(torchvision.models.list_models(module=torchvision.models))
    return list(BUILTIN_MODELS) + [n for n in tv if n not in BUILTIN_MODELS]


def _import_factory(name: str) -> ModelFactory:
    """``package.module:function`` -> that function (a user's own model factory)."""
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import model factory '{name}': {err}") from err
    if not callable(factory):
        raise ValueError(f"model factory '{name}' is not callable")
    return factory


def is_known_model(name: str) -> bool:
    """Whether :func:`build_model` accepts ``name``.

    ``package.module:function`` names a user's factory ``(input_shape, num_classes) ->
    nn.Module``; it is accepted here and imported when the model is built.
    """
    if ":" in name:
        return bool(name.partition(":")[0]) and bool(name.partition(":")[2])
    if name in BUILTIN_MODELS:
        return True
    import torchvision

    return name in torchvision.models.list_models(module=torchvision.models)


def build_model(
    name: str, input_shape: InputShape, num_classes: int, seed: int | None = None
) -> nn.Module:
    """Build model ``name`` for inputs of ``input_shape`` and ``num_classes`` classes.

    ``seed`` makes the initial weights reproducible. The model is checked with one
    forward pass, so an architecture that cannot take this input fails here, naming it.
    """
    if not is_known_model(name):
        raise ValueError(
            f"unknown model '{name}'; use one of {list(BUILTIN_MODELS)}, a torchvision "
            "classification model name (torchvision.models.list_models()) or your own "
            "factory as 'package.module:function'"
        )
    if ":" in name:
        factory = _import_factory(name)
    else:
        factory = BUILTIN_MODELS.get(name) or torchvision_model(name)
    if seed is None:
        model = factory(input_shape, num_classes)
    else:
        with torch.random.fork_rng(devices=[]):  # seeding must not reset the caller's RNG
            torch.manual_seed(seed)
            model = factory(input_shape, num_classes)
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except RuntimeError as err:
        raise ValueError(
            f"model '{name}' cannot take inputs of shape {input_shape}: {err}"
        ) from err
    if out.shape != (2, num_classes):
        raise ValueError(
            f"model '{name}' returned shape {tuple(out.shape)} for a batch of 2, "
            f"expected (2, {num_classes})"
        )
    model.train()
    return model


def head_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the model's last linear layer: the head FedPer keeps private."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ValueError(f"{type(model).__name__} has no linear layer to serve as a head")
    prefix = f"{last}." if last else ""
    return [k for k in model.state_dict() if k.startswith(prefix) and "." not in k[len(prefix) :]]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is available, else ``cpu``; otherwise as named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but torch sees no CUDA GPU")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device '{name}' requested but torch sees {torch.cuda.device_count()} GPU(s)"
            )
    return device


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict on the CPU (what goes into records and files)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def matching_keys(model: nn.Module, patterns: list[str]) -> list[str]:
    """State-dict keys of ``model`` matched by any of the regular expressions ``patterns``."""
    return [k for k in model.state_dict() if any(re.search(p, k) for p in patterns)]
