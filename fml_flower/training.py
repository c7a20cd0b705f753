"""Training and evaluation loops: the deep-mutual-learning step of FML and a plain step.

Plain PyTorch, no Flower. The losses follow the specification exactly::

    L_local = alpha * CE(z_L, y) + (1 - alpha) * KL(p_M.detach() || p_L)
    L_meme  = beta  * CE(z_M, y) + (1 - beta)  * KL(p_L.detach() || p_M)

with KL summed over classes and averaged over the batch (``batchmean``), no temperature.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

UPDATE_MODES = ("simultaneous", "sequential")


def kl_to_target(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student), summed over classes, averaged over the batch.

    The teacher is detached: it is a fixed target and receives no gradient.
    """
    return F.kl_div(
        F.log_softmax(student_logits, dim=1),
        F.softmax(teacher_logits.detach(), dim=1),
        reduction="batchmean",
    )


def mutual_losses(
    local_logits: torch.Tensor,
    meme_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two FML losses ``(L_local, L_meme)`` for one batch."""
    loss_local = alpha * F.cross_entropy(local_logits, labels) + (1 - alpha) * kl_to_target(
        local_logits, meme_logits
    )
    loss_meme = beta * F.cross_entropy(meme_logits, labels) + (1 - beta) * kl_to_target(
        meme_logits, local_logits
    )
    return loss_local, loss_meme


LAST_BATCH_POLICIES = ("keep", "drop", "merge")

Batches = tuple[torch.Tensor, torch.Tensor] | Iterable[tuple[torch.Tensor, torch.Tensor]]
"""Training data: ``(x, y)`` tensors (shuffled and batched here) or any iterable of
``(x, y)`` batches, e.g. a ``torch.utils.data.DataLoader`` (used as it is)."""


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None,
    last_batch: str = "keep",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled mini-batches of in-memory tensors.

    ``last_batch`` decides what happens to an incomplete last batch: ``keep`` it (a step on
    the remainder), ``drop`` it, or ``merge`` it into the previous batch. With fewer
    examples than one batch there is always exactly one batch of all of them.

    Data already sits in memory as ready tensors, so slicing a permutation is all a
    loader has to do; ``torch.utils.data.DataLoader`` would add per-sample indexing and
    collation on the hot path for no benefit.
    """
    if last_batch not in LAST_BATCH_POLICIES:
        raise ValueError(f"last_batch must be one of {LAST_BATCH_POLICIES}, got '{last_batch}'")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(y)
    order = torch.randperm(n, generator=generator).to(y.device)
    full, rest = divmod(n, batch_size)
    starts = list(range(0, n, batch_size))
    ends = [min(s + batch_size, n) for s in starts]
    if rest and full >= 1 and last_batch == "drop":
        starts, ends = starts[:-1], ends[:-1]
    elif rest and full >= 1 and last_batch == "merge":
        starts, ends = starts[:-1], [*ends[:-2], n]
    for start, end in zip(starts, ends, strict=True):
        idx = order[start:end]
        yield x[idx], y[idx]


def as_batches(
    data: Batches,
    batch_size: int,
    generator: torch.Generator | None = None,
    last_batch: str = "keep",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``data`` with int64 labels: tensors are shuffled and cut by
    :func:`batches`; an iterable of batches (a DataLoader) is used as it is.
    """
    if isinstance(data, tuple) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        x, y = data
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} labels")
        source: Iterable[tuple[torch.Tensor, torch.Tensor]] = batches(
            x, y, batch_size, generator, last_batch
        )
    else:
        source = data  # type: ignore[assignment]
    for xb, yb in source:
        yield xb, as_labels(yb)


def as_labels(y: torch.Tensor) -> torch.Tensor:
    """Class labels as int64 (cross-entropy's dtype), refusing non-integer labels."""
    if y.dtype == torch.long:
        return y
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got {y.dtype}")
    return y.long()


def check_weight(name: str, value: float) -> float:
    """``value`` as a float in [0, 1], else ``ValueError`` naming ``name`` (the check the
    strategy applies to what it sends, applied again where the value is used).
    """
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


@dataclass
class EpochStats:
    """Running sums of one or more training epochs.

    The sums stay on the training device as one tensor and are read once, in
    :meth:`means`: reading a loss with ``float()`` after every batch would make a GPU wait
    for each batch to finish before queueing the next one.
    """

    examples: int = 0
    sums: torch.Tensor | None = None
    """``[loss_local, loss_meme, correct_local, correct_meme]`` summed over examples."""

    @torch.no_grad()
    def add(
        self,
        n: int,
        loss_local: torch.Tensor,
        loss_meme: torch.Tensor | None,
        local_logits: torch.Tensor,
        meme_logits: torch.Tensor | None,
        labels: torch.Tensor,
    ) -> None:
        """Add one batch of ``n`` examples."""
        self.examples += n
        zero = loss_local.new_zeros(())
        row = torch.stack(
            [
                loss_local.detach().float() * n,
                zero if loss_meme is None else loss_meme.detach().float() * n,
                (local_logits.argmax(1) == labels).sum().float(),
                zero if meme_logits is None else (meme_logits.argmax(1) == labels).sum().float(),
            ]
        )
        self.sums = row if self.sums is None else self.sums + row

    def means(self) -> dict[str, float]:
        """Per-example means of the sums."""
        n = max(self.examples, 1)
        sums = [0.0] * 4 if self.sums is None else self.sums.tolist()
        return {
            "train_loss_local": sums[0] / n,
            "train_loss_meme": sums[1] / n,
            "train_acc_local": sums[2] / n,
            "train_acc_meme": sums[3] / n,
        }


Step = Callable[[torch.Tensor, torch.Tensor, "EpochStats"], None]
"""One optimization step on a batch ``(x, y)`` that adds what it saw to the stats."""


def run_epochs(
    step: Step,
    data: Batches,
    batch_size: int,
    epochs: int = 1,
    generator: torch.Generator | None = None,
    last_batch: str = "keep",
    stats: EpochStats | None = None,
) -> EpochStats:
    """The one local-epoch loop: ``epochs`` passes of ``step`` over the batches of ``data``."""
    stats = stats if stats is not None else EpochStats()
    for _ in range(epochs):
        for xb, yb in as_batches(data, batch_size, generator, last_batch):
            step(xb, yb, stats)
    return stats


def mutual_step(
    local: nn.Module,
    meme: nn.Module,
    opt_local: torch.optim.Optimizer,
    opt_meme: torch.optim.Optimizer,
    alpha: float,
    beta: float,
    update: str = "simultaneous",
) -> Step:
    """The deep-mutual-learning step of FML for one batch, as a :data:`Step`.

    ``update="simultaneous"`` (the FML reference): both models see the same batch, both
    losses use the partner's logits from before the step, both optimizers step.
    ``update="sequential"`` (the original DML): the local model steps first, then the
    meme learns from the updated local model's predictions on the same batch (that second
    forward pass runs in train mode, so BatchNorm statistics of the local model move twice
    per batch, as in DML implementations).
    """
    if update not in UPDATE_MODES:
        raise ValueError(f"update must be one of {UPDATE_MODES}, got '{update}'")
    alpha, beta = check_weight("alpha", alpha), check_weight("beta", beta)

    def step(xb: torch.Tensor, yb: torch.Tensor, stats: EpochStats) -> None:
        local.train()
        meme.train()
        local_logits = local(xb)
        meme_logits = meme(xb)
        if update == "simultaneous":
            loss_local, loss_meme = mutual_losses(local_logits, meme_logits, yb, alpha, beta)
            opt_local.zero_grad(set_to_none=True)
            opt_meme.zero_grad(set_to_none=True)
            # The partners are detached, so the two graphs are disjoint and one backward
            # of the sum gives each model exactly the gradient of its own loss.
            (loss_local + loss_meme).backward()
            opt_local.step()
            opt_meme.step()
        else:
            loss_local, _ = mutual_losses(local_logits, meme_logits, yb, alpha, beta)
            opt_local.zero_grad(set_to_none=True)
            loss_local.backward()
            opt_local.step()
            with torch.no_grad():
                teacher = local(xb)
            _, loss_meme = mutual_losses(teacher, meme_logits, yb, alpha, beta)
            opt_meme.zero_grad(set_to_none=True)
            loss_meme.backward()
            opt_meme.step()
        stats.add(len(yb), loss_local.detach(), loss_meme.detach(), local_logits, meme_logits, yb)

    return step


def supervised_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    proximal_mu: float = 0.0,
    anchor: list[torch.Tensor] | None = None,
) -> Step:
    """A cross-entropy step, plus ``mu/2 ||w - anchor||^2`` if ``proximal_mu > 0``.

    The proximal term is FedProx's (anchor = the global weights the round started from)
    and Ditto's (anchor = the global weights, for the personal model). ``anchor``
    defaults to the model's weights when the step is made. Losses are reported as
    ``train_loss_local``; the meme columns stay zero.
    """
    if proximal_mu > 0 and anchor is None:
        anchor = [p.detach().clone() for p in model.parameters()]

    def step(xb: torch.Tensor, yb: torch.Tensor, stats: EpochStats) -> None:
        model.train()
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        if proximal_mu > 0:
            loss = loss + proximal_mu / 2 * proximal_term(model, anchor)  # type: ignore[arg-type]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stats.add(len(yb), loss.detach(), None, logits, None, yb)

    return step


def mutual_learning_epoch(
    local: nn.Module,
    meme: nn.Module,
    opt_local: torch.optim.Optimizer,
    opt_meme: torch.optim.Optimizer,
    data: Batches,
    batch_size: int = 32,
    alpha: float = 0.5,
    beta: float = 0.5,
    update: str = "simultaneous",
    generator: torch.Generator | None = None,
    stats: EpochStats | None = None,
    last_batch: str = "keep",
) -> EpochStats:
    """One epoch of deep mutual learning between ``local`` and ``meme``.

    ``data`` is ``(x, y)`` tensors (shuffled with ``generator`` and cut into batches of
    ``batch_size``) or an iterable of ``(x, y)`` batches such as a DataLoader. Labels may
    be any integer dtype. Returns the :class:`EpochStats` (``.means()`` gives the mean
    losses and accuracies of both models over the epoch). See :func:`mutual_step`.
    """
    step = mutual_step(local, meme, opt_local, opt_meme, alpha, beta, update)
    return run_epochs(step, data, batch_size, 1, generator, last_batch, stats)


def proximal_term(model: nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    """Squared L2 distance between ``model``'s parameters and ``anchor`` (FedProx)."""
    return sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))  # type: ignore[return-value]


def supervised_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: Batches,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    proximal_mu: float = 0.0,
    anchor: list[torch.Tensor] | None = None,
    stats: EpochStats | None = None,
    last_batch: str = "keep",
) -> EpochStats:
    """One epoch of cross-entropy training (see :func:`supervised_step`)."""
    step = supervised_step(model, opt, proximal_mu, anchor)
    return run_epochs(step, data, batch_size, 1, generator, last_batch, stats)


@dataclass(frozen=True)
class EvalResult:
    """Loss and accuracy of one model on one dataset."""

    loss: float
    correct: int
    examples: int

    @property
    def accuracy(self) -> float:
        """Fraction of correct predictions (0 when there are no examples)."""
        return self.correct / self.examples if self.examples else 0.0


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512
) -> EvalResult:
    """Cross-entropy loss and accuracy of ``model`` on ``(x, y)`` in eval mode."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        logits = model(xb)
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    return EvalResult(loss / max(len(y), 1), correct, len(y))


def sgd(
    model: nn.Module | Iterable[nn.Parameter], lr: float, momentum: float, weight_decay: float
) -> torch.optim.SGD:
    """The SGD optimizer used throughout (the FML authors' choice), over a model's
    parameters or the given ones.
    """
    params = model.parameters() if isinstance(model, nn.Module) else model
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
