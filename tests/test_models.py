"""The model zoo: every built-in name on both input shapes, torchvision by name."""

from __future__ import annotations

import pytest
import torch

from fml_flower.models import available_models, build_model


@pytest.mark.parametrize("name", ["mlp", "lenet5", "cnn", "resnet18", "cnn-unpadded"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_builtin_models_take_both_shapes(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(name, shape, 7)
    assert model(torch.randn(3, *shape)).shape == (3, 7)


def test_cnn_is_mcmahan_geometry() -> None:
    model = build_model("cnn", (1, 28, 28), 10)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(7 * 7 * 64, 512), (512, 10)]


def test_the_two_layouts_of_the_mcmahan_cnn() -> None:
    """``cnn`` pads its convolutions (1.66 M parameters on MNIST), ``cnn-unpadded`` does not
    (0.58 M): a comparison with another library has to name the layout."""
    padded, unpadded = (build_model(n, (1, 28, 28), 10) for n in ("cnn", "cnn-unpadded"))
    assert sum(p.numel() for p in padded.parameters()) == 1_663_370
    assert sum(p.numel() for p in unpadded.parameters()) == 582_026
    linears = [m for m in unpadded.modules() if isinstance(m, torch.nn.Linear)]
    assert linears[0].in_features == 4 * 4 * 64


def test_torchvision_model_by_name_on_grayscale() -> None:
    model = build_model("mobilenet_v3_small", (1, 32, 32), 10)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_seed_makes_initial_weights_reproducible() -> None:
    a = build_model("cnn", (1, 28, 28), 10, seed=5).state_dict()
    b = build_model("cnn", (1, 28, 28), 10, seed=5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'nope'.*mlp"):
        build_model("nope", (1, 28, 28), 10)
    assert available_models()[:5] == ["mlp", "lenet5", "cnn", "resnet18", "cnn-unpadded"]


def test_model_that_cannot_take_the_input_fails_clearly() -> None:
    with pytest.raises(ValueError, match="cannot take inputs of shape"):
        build_model("alexnet", (1, 28, 28), 10)


def test_device_resolution() -> None:
    from fml_flower.models import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")


def tiny_factory(input_shape: tuple[int, int, int], num_classes: int) -> torch.nn.Module:
    """A user's own model factory, referenced as 'tests.test_models:tiny_factory'."""
    c, h, w = input_shape
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(c * h * w, num_classes))


def test_users_own_factory_by_import_path() -> None:
    model = build_model("tests.test_models:tiny_factory", (1, 28, 28), 10, seed=1)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"cannot import model factory 'nope\.mod:f'"):
        build_model("nope.mod:f", (1, 28, 28), 10)
