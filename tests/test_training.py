"""The mutual-learning step against a hand computation, and the gradient isolation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fml_flower.models import build_model
from fml_flower.training import (
    Compute,
    EpochStats,
    batches,
    evaluate,
    kl_to_target,
    mutual_learning_epoch,
    mutual_losses,
    mutual_step,
    resolve_last_batch,
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


# ------------------------------------------------------------------ PFLlib's variant


def test_pfllib_losses_equal_hand_computation() -> None:
    """KL with ``mean`` reduction: summed over classes, divided by batch x classes."""
    zl = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]]
    zm = [[0.0, 1.5, 0.5], [1.0, -0.5, 2.0]]
    y = [0, 2]
    alpha, beta = 0.3, 0.8
    loss_local, loss_meme = mutual_losses(
        torch.tensor(zl), torch.tensor(zm), torch.tensor(y), alpha, beta, "pfllib"
    )
    classes = 3
    expected_local = alpha * _hand_ce(zl, y) + (1 - alpha) * _hand_kl(zm, zl) / classes
    expected_meme = beta * _hand_ce(zm, y) + (1 - beta) * _hand_kl(zl, zm) / classes
    assert loss_local.item() == pytest.approx(expected_local, rel=1e-6)
    assert loss_meme.item() == pytest.approx(expected_meme, rel=1e-6)


def test_pfllib_sends_gradient_into_the_partner() -> None:
    zl = torch.randn(4, 5, requires_grad=True)
    zm = torch.randn(4, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    loss_local, loss_meme = mutual_losses(zl, zm, y, 0.5, 0.5, "pfllib")
    (g,) = torch.autograd.grad(loss_local, zm)
    assert g.abs().sum() > 0
    (g,) = torch.autograd.grad(loss_meme, zl)
    assert g.abs().sum() > 0


@pytest.mark.parametrize("scale", [1.0, 50.0])  # 50: gradient norms above 10, clipped
def test_pfllib_step_equals_pfllib_client_by_hand(scale: float) -> None:
    """One step equals PFLlib's clientFML written out: two backward calls accumulating
    into both models, ``nn.KLDivLoss()`` on probabilities, clipping at 10, SGD.
    """
    x, y = _toy()
    x = x * scale
    local = build_model("mlp", (1, 8, 8), 3, seed=1)
    meme = build_model("mlp", (1, 8, 8), 3, seed=2)
    ref_local = build_model("mlp", (1, 8, 8), 3, seed=1)
    ref_meme = build_model("mlp", (1, 8, 8), 3, seed=2)
    stats = mutual_learning_epoch(
        local,
        meme,
        sgd(local, 0.1, 0, 0),
        sgd(meme, 0.1, 0, 0),
        (x, y),
        batch_size=64,
        alpha=0.4,
        beta=0.7,
        distillation="pfllib",
    )
    kl = nn.KLDivLoss()  # reduction "mean", as PFLlib
    out, out_g = ref_local(x), ref_meme(x)
    f = nn.functional
    loss = nn.functional.cross_entropy(out, y) * 0.4 + kl(
        f.log_softmax(out, dim=1), f.softmax(out_g, dim=1)
    ) * (1 - 0.4)
    loss_g = nn.functional.cross_entropy(out_g, y) * 0.7 + kl(
        f.log_softmax(out_g, dim=1), f.softmax(out, dim=1)
    ) * (1 - 0.7)
    loss.backward(retain_graph=True)
    loss_g.backward()
    norms = [
        nn.utils.clip_grad_norm_(ref_local.parameters(), 10),
        nn.utils.clip_grad_norm_(ref_meme.parameters(), 10),
    ]
    if scale > 1:
        assert max(float(n) for n in norms) > 10  # the clipping really acts here
    with torch.no_grad():
        for m in (ref_local, ref_meme):
            for p in m.parameters():
                p -= 0.1 * p.grad
    for a, b in zip(local.parameters(), ref_local.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(meme.parameters(), ref_meme.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert stats.means()["meme_nonfinite_batches"] == 0


def test_pfllib_drops_the_last_incomplete_batch_by_default() -> None:
    assert resolve_last_batch("auto", "pfllib") == "drop"
    assert resolve_last_batch("auto", "faithful") == "keep"
    assert resolve_last_batch("merge", "pfllib") == "merge"  # an explicit choice stays
    x, y = _toy()  # 64 examples, batches of 24: 24 + 24 (+ 16 dropped)
    m1, m2 = build_model("mlp", (1, 8, 8), 3, seed=1), build_model("mlp", (1, 8, 8), 3, seed=2)
    stats = mutual_learning_epoch(
        m1, m2, sgd(m1, 0.1, 0, 0), sgd(m2, 0.1, 0, 0), (x, y), 24, distillation="pfllib"
    )
    assert stats.examples == 48


def test_pfllib_is_refused_with_the_sequential_update() -> None:
    m = build_model("mlp", (1, 8, 8), 3)
    with pytest.raises(ValueError, match="PFLlib's simultaneous step"):
        mutual_step(m, m, sgd(m, 0.1, 0, 0), sgd(m, 0.1, 0, 0), 0.5, 0.5, "sequential", "pfllib")


# ------------------------------------------------------- numerically safe distillation


def test_kl_is_finite_for_extreme_logits() -> None:
    """softmax -> 0 for a class of a very confident teacher: the probability form would
    compute 0 * log 0; from log-probabilities it is finite and exact.
    """
    student = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[1e4, -1e4, 0.0]])
    kl = kl_to_target(student, teacher)
    assert torch.isfinite(kl)
    assert kl.item() == pytest.approx(math.log(3), rel=1e-6)  # KL(one-hot || uniform)
    kl.backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("distillation", ["faithful", "pfllib"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_meme_trains_the_local_model_on_labels_alone(
    distillation: str, bad: float
) -> None:
    """A corrupt meme (NaN/Inf outputs) never reaches the personalized model: its step is
    the cross-entropy step, and the batch is counted.
    """
    x, y = _toy()
    local = build_model("mlp", (1, 8, 8), 3, seed=1)
    ref = build_model("mlp", (1, 8, 8), 3, seed=1)
    meme = build_model("mlp", (1, 8, 8), 3, seed=2)
    with torch.no_grad():
        meme.net[-1].bias.fill_(bad)
    stats = mutual_learning_epoch(
        local,
        meme,
        sgd(local, 0.1, 0, 0),
        sgd(meme, 0.1, 0, 0),
        (x, y),
        batch_size=32,
        generator=torch.Generator().manual_seed(0),
        distillation=distillation,
        last_batch="keep",
    )
    gen = torch.Generator().manual_seed(0)
    supervised_epoch(ref, sgd(ref, 0.1, 0, 0), (x, y), batch_size=32, generator=gen)
    for a, b in zip(local.parameters(), ref.parameters(), strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
    means = stats.means()
    assert means["meme_nonfinite_batches"] == 2
    assert math.isfinite(means["train_loss_meme"]) and math.isfinite(means["train_loss_local"])


def test_finite_batches_are_not_counted() -> None:
    x, y = _toy()
    m1, m2 = build_model("mlp", (1, 8, 8), 3, seed=1), build_model("mlp", (1, 8, 8), 3, seed=2)
    stats = mutual_learning_epoch(m1, m2, sgd(m1, 0.1, 0, 0), sgd(m2, 0.1, 0, 0), (x, y), 16)
    assert stats.means()["meme_nonfinite_batches"] == 0
    assert (
        "meme_nonfinite_batches" not in supervised_epoch(m1, sgd(m1, 0.1, 0, 0), (x, y), 16).means()
    )


# --------------------------------------------------------- precision and memory format


def test_bf16_trains_with_fp32_weights_and_losses() -> None:
    x, y = _toy()
    local = build_model("cnn", (1, 8, 8), 3, seed=1)
    meme = build_model("cnn", (1, 8, 8), 3, seed=2)
    compute = Compute("bf16")
    stats = mutual_learning_epoch(
        local,
        meme,
        sgd(local, 0.05, 0.9, 0),
        sgd(meme, 0.05, 0.9, 0),
        (x, y),
        16,
        compute=compute,
    )
    assert all(p.dtype == torch.float32 for p in local.parameters())
    assert all(p.dtype == torch.float32 for p in meme.parameters())
    assert math.isfinite(stats.means()["train_loss_local"])
    logits = compute.forward(local, x[:4])
    assert logits.dtype == torch.float32
    with compute.autocast(x.device):
        assert local(x[:4]).dtype == torch.bfloat16  # the forward pass really ran in bf16
    result = evaluate(local, x, y, compute=compute)
    assert math.isfinite(result.loss)


def test_channels_last_changes_the_layout_not_the_result() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 3, (64,), generator=g)
    runs = []
    for compute in (Compute(), Compute(channels_last=True)):
        local = compute.model(build_model("cnn-unpadded", (3, 16, 16), 3, seed=1))
        meme = compute.model(build_model("cnn-unpadded", (3, 16, 16), 3, seed=2))
        mutual_learning_epoch(
            local,
            meme,
            sgd(local, 0.05, 0.9, 0),
            sgd(meme, 0.05, 0.9, 0),
            (x, y),
            16,
            generator=torch.Generator().manual_seed(0),
            compute=compute,
        )
        runs.append(local)
    conv = runs[1].features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_auto_memory_format_and_the_bf16_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    import fml_flower.training as training

    assert Compute.resolve("fp32", "auto", "cpu") == Compute("fp32", False)
    assert Compute.resolve("fp32", "channels_last", "cpu").channels_last
    mlp = build_model("mlp", (1, 8, 8), 3)
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: True)
    assert Compute.resolve("bf16", "auto", "cpu") == Compute("bf16", True)
    assert not Compute.resolve("bf16", "auto", "cpu", model=mlp).channels_last
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(training, "_warned_bf16", False)
    with pytest.warns(RuntimeWarning, match="without native bf16"):
        Compute.resolve("bf16", "auto", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        Compute("fp16")
    with pytest.raises(ValueError, match="memory_format must be one of"):
        Compute.resolve("fp32", "nhwc", "cpu")


def test_models_with_different_outputs_are_refused_on_the_first_batch_before_any_step() -> None:
    x, y = _toy()
    y = y + 7  # labels 7..9
    local = build_model("mlp", (1, 8, 8), 7, seed=1)  # 7 outputs
    meme = build_model("mlp", (1, 8, 8), 10, seed=2)
    before = [p.detach().clone() for p in local.parameters()]
    with pytest.raises(
        ValueError, match="the personalized model outputs 7, the meme model outputs 10"
    ):
        mutual_learning_epoch(local, meme, sgd(local, 0.1, 0, 0), sgd(meme, 0.1, 0, 0), (x, y), 16)
    assert all(torch.equal(a, b) for a, b in zip(before, local.parameters(), strict=True))
    small = build_model("mlp", (1, 8, 8), 7, seed=2)
    with pytest.raises(
        ValueError, match=r"labels go from 7 to 9 but the personalized model outputs 7"
    ):
        mutual_learning_epoch(
            local, small, sgd(local, 0.1, 0, 0), sgd(small, 0.1, 0, 0), (x, y), 16
        )
    with pytest.raises(ValueError, match=r"labels go from 7 to 9 but the trained model outputs 7"):
        supervised_epoch(local, sgd(local, 0.1, 0, 0), (x, y), 16)


def test_the_plug_in_client_names_its_partition_in_errors_and_metrics() -> None:
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

    from client_app.fml import train as fml_train
    from fml_flower.settings import RoundSettings

    x, y = _toy()
    meme = build_model("mlp", (1, 8, 8), 3, seed=2)
    settings = RoundSettings(lr=0.05, batch_size=16, alpha=0.3, beta=0.6)
    content = RecordDict(
        {"arrays": ArrayRecord(meme.state_dict()), "config": ConfigRecord(settings.to_config())}
    )
    context = Context(
        run_id=1, node_id=5, state=RecordDict(), node_config={"partition-id": 4}, run_config={}
    )
    local = build_model("mlp", (1, 8, 8), 3, seed=1)
    reply = fml_train(content, context, meme=meme, local=local, data=(x, y))
    metrics = reply["metrics"]
    assert metrics["partition_id"] == 4
    assert (metrics["lr"], metrics["alpha"], metrics["beta"]) == (0.05, 0.3, 0.6)
    wrong = build_model("mlp", (1, 8, 8), 7, seed=1)
    fresh = Context(
        run_id=1, node_id=6, state=RecordDict(), node_config={"partition-id": 5}, run_config={}
    )
    with pytest.raises(ValueError, match=r"^partition 5: ValueError: the personalized model"):
        fml_train(content, fresh, meme=build_model("mlp", (1, 8, 8), 3), local=wrong, data=(x, y))
