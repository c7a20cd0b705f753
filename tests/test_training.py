"""The mutual-learning step against a hand computation, and the gradient isolation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fml_flower.models import build_model
from fml_flower.training import (
    EpochStats,
    batches,
    evaluate,
    kl_to_target,
    mutual_learning_epoch,
    mutual_losses,
    sgd,
    supervised_epoch,
)


def _hand_kl(teacher: list[list[float]], student: list[list[float]]) -> float:
    """KL(p_teacher || p_student) summed over classes, averaged over the batch, by hand."""

    def softmax(z: list[float]) -> list[float]:
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]

    total = 0.0
    for zt, zs in zip(teacher, student, strict=True):
        pt, ps = softmax(zt), softmax(zs)
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps, strict=True))
    return total / len(teacher)


def _hand_ce(logits: list[list[float]], labels: list[int]) -> float:
    total = 0.0
    for z, y in zip(logits, labels, strict=True):
        total += -(z[y] - math.log(sum(math.exp(v) for v in z)))
    return total / len(logits)


def test_losses_equal_hand_computation() -> None:
    zl = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]]
    zm = [[0.0, 1.5, 0.5], [1.0, -0.5, 2.0]]
    y = [0, 2]
    alpha, beta = 0.3, 0.8
    loss_local, loss_meme = mutual_losses(
        torch.tensor(zl), torch.tensor(zm), torch.tensor(y), alpha, beta
    )
    expected_local = alpha * _hand_ce(zl, y) + (1 - alpha) * _hand_kl(zm, zl)
    expected_meme = beta * _hand_ce(zm, y) + (1 - beta) * _hand_kl(zl, zm)
    assert loss_local.item() == pytest.approx(expected_local, rel=1e-6)
    assert loss_meme.item() == pytest.approx(expected_meme, rel=1e-6)


def test_kl_is_batchmean_not_mean_over_classes() -> None:
    teacher = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    student = torch.zeros(1, 4)
    expected = _hand_kl(teacher.tolist(), student.tolist())
    assert kl_to_target(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    # reduction="mean" would divide by the 4 classes as well
    assert kl_to_target(student, teacher).item() > 2 * expected / 4


def test_no_gradient_reaches_the_partner() -> None:
    zl = torch.randn(4, 5, requires_grad=True)
    zm = torch.randn(4, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    loss_local, loss_meme = mutual_losses(zl, zm, y, 0.5, 0.5)
    (g_meme_from_local,) = torch.autograd.grad(loss_local, zm, allow_unused=True)
    (g_local_from_meme,) = torch.autograd.grad(loss_meme, zl, allow_unused=True)
    assert g_meme_from_local is None
    assert g_local_from_meme is None
    # and each loss does reach its own model
    assert torch.autograd.grad(loss_local, zl)[0].abs().sum() > 0


def test_alpha_one_is_plain_cross_entropy() -> None:
    zl, zm, y = torch.randn(6, 3), torch.randn(6, 3), torch.randint(0, 3, (6,))
    loss_local, _ = mutual_losses(zl, zm, y, 1.0, 0.5)
    assert loss_local.item() == pytest.approx(nn.functional.cross_entropy(zl, y).item())


def _toy(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g)


@pytest.mark.parametrize("update", ["simultaneous", "sequential"])
def test_epoch_gradients_match_separate_losses(update: str) -> None:
    """One step of the epoch equals stepping each model on its own loss, by hand."""
    x, y = _toy()
    local = build_model("mlp", (1, 8, 8), 3, seed=1)
    meme = build_model("mlp", (1, 8, 8), 3, seed=2)
    ref_local = build_model("mlp", (1, 8, 8), 3, seed=1)
    ref_meme = build_model("mlp", (1, 8, 8), 3, seed=2)
    mutual_learning_epoch(
        local,
        meme,
        sgd(local, 0.1, 0, 0),
        sgd(meme, 0.1, 0, 0),
        (x, y),
        batch_size=64,
        alpha=0.4,
        beta=0.7,
        update=update,
    )
    zl, zm = ref_local(x), ref_meme(x)
    loss_local, _ = mutual_losses(zl, zm, y, 0.4, 0.7)
    loss_local.backward()
    with torch.no_grad():
        for p in ref_local.parameters():
            p -= 0.1 * p.grad
    teacher = ref_local(x) if update == "sequential" else zl
    _, loss_meme = mutual_losses(teacher, zm, y, 0.4, 0.7)
    ref_meme.zero_grad()
    loss_meme.backward()
    with torch.no_grad():
        for p in ref_meme.parameters():
            p -= 0.1 * p.grad
    for a, b in zip(local.parameters(), ref_local.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(meme.parameters(), ref_meme.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_mutual_learning_reduces_loss_and_reports_stats() -> None:
    x, y = _toy()
    local = build_model("mlp", (1, 8, 8), 3, seed=1)
    meme = build_model("mlp", (1, 8, 8), 3, seed=2)
    before = evaluate(local, x, y).loss
    stats = EpochStats()
    for _ in range(20):
        mutual_learning_epoch(
            local,
            meme,
            sgd(local, 0.05, 0.9, 0),
            sgd(meme, 0.05, 0.9, 0),
            (x, y),
            16,
            0.5,
            0.5,
            stats=stats,
        )
    assert evaluate(local, x, y).loss < before
    assert stats.examples == 20 * 64
    assert 0 <= stats.means()["train_acc_meme"] <= 1


def test_unknown_update_mode_is_refused() -> None:
    x, y = _toy()
    m = build_model("mlp", (1, 8, 8), 3)
    with pytest.raises(ValueError, match="update must be one of"):
        mutual_learning_epoch(
            m, m, sgd(m, 0.1, 0, 0), sgd(m, 0.1, 0, 0), (x, y), 8, 0.5, 0.5, update="alternating"
        )


def test_proximal_term_pulls_towards_start() -> None:
    x, y = _toy()
    free = build_model("mlp", (1, 8, 8), 3, seed=3)
    prox = build_model("mlp", (1, 8, 8), 3, seed=3)
    start = [p.detach().clone() for p in free.parameters()]
    for model, mu in ((free, 0.0), (prox, 10.0)):
        supervised_epoch(
            model,
            sgd(model, 0.1, 0, 0),
            (x, y),
            8,
            torch.Generator().manual_seed(0),
            proximal_mu=mu,
        )

    def dist(m: nn.Module) -> float:
        return sum(((p - s) ** 2).sum().item() for p, s in zip(m.parameters(), start, strict=True))

    assert dist(prox) < dist(free)


@pytest.mark.parametrize(
    ("n", "policy", "sizes"),
    [
        (10, "keep", [4, 4, 2]),
        (10, "drop", [4, 4]),
        (10, "merge", [4, 6]),
        (8, "merge", [4, 4]),
        (3, "drop", [3]),  # fewer than one batch: always one step on all of them
        (3, "merge", [3]),
    ],
)
def test_last_batch_policy(n: int, policy: str, sizes: list[int]) -> None:
    x, y = torch.arange(n).float().view(n, 1), torch.arange(n)
    got = list(batches(x, y, 4, torch.Generator().manual_seed(0), policy))
    assert [len(b[1]) for b in got] == sizes
    seen = torch.cat([b[1] for b in got])
    assert len(set(seen.tolist())) == len(seen)  # no example twice in an epoch
    if policy != "drop":
        assert sorted(seen.tolist()) == list(range(n))


def test_epoch_takes_a_dataloader_and_int32_labels() -> None:
    x, y = _toy()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y.to(torch.int32)), batch_size=16
    )
    local = build_model("mlp", (1, 8, 8), 3, seed=1)
    meme = build_model("mlp", (1, 8, 8), 3, seed=2)
    stats = mutual_learning_epoch(
        local, meme, sgd(local, 0.1, 0, 0), sgd(meme, 0.1, 0, 0), loader, 999, 0.5, 0.5
    )
    assert stats.examples == 64


def test_weights_outside_unit_interval_are_refused_where_used() -> None:
    x, y = _toy()
    m = build_model("mlp", (1, 8, 8), 3)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        mutual_learning_epoch(m, m, sgd(m, 0.1, 0, 0), sgd(m, 0.1, 0, 0), (x, y), 8, 1.5, 0.5)


def test_float_labels_are_refused() -> None:
    x, y = _toy()
    m = build_model("mlp", (1, 8, 8), 3)
    with pytest.raises(TypeError, match="integer class indices"):
        supervised_epoch(m, sgd(m, 0.1, 0, 0), (x, y.float()), 8)
