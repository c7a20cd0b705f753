"""Training and evaluation loops: the deep-mutual-learning step of FML and a plain step.

Plain PyTorch, no Flower. The ``faithful`` losses (the default) follow the specification
and the authors' code exactly::

    L_local = alpha * CE(z_L, y) + (1 - alpha) * KL(p_M.detach() || p_L)
    L_meme  = beta  * CE(z_M, y) + (1 - beta)  * KL(p_L.detach() || p_M)

with KL summed over classes and averaged over the batch (``batchmean``), no temperature,
the partner's prediction detached (each model gets the gradient of its own loss only).

``distillation="pfllib"`` is PFLlib's ``clientFML`` (``system/flcore/clients/clientfml.py``):
``nn.KLDivLoss()`` with its default ``mean`` reduction (the KL divided by the number of
classes as well), the partner's probabilities *not* detached (``loss.backward();
loss_g.backward()``: each model also receives the gradient of the other model's KL term),
and each model's gradient norm clipped at :data:`PFLLIB_CLIP_NORM` before the step. PFLlib
also drops the last incomplete batch (``DataLoader(drop_last=True)``: ``last_batch="auto"``,
:func:`resolve_last_batch`) and its server averages the memes uniformly (``serverfml.py``).

Both KL terms are computed from log-probabilities on both sides (``log_softmax`` and
``log_target=True``), in fp32 whatever the autocast precision, so that a confident or
corrupt partner cannot produce ``0 * log 0`` or ``inf - inf``; a batch whose meme
log-probabilities are not finite (a noised or poisoned global model) trains the
personalized model on its labels alone and is counted (:attr:`EpochStats.nonfinite`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fml_flower.settings import DISTILLATIONS

UPDATE_MODES = ("simultaneous", "sequential")

PFLLIB_CLIP_NORM = 10.0
"""PFLlib's ``clip_grad_norm_(..., 10)`` on both models ("prevent divergency")."""

PRECISIONS = ("fp32", "bf16")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions oneDNN uses (AVX-512 BF16 or AMX).

    Without them, bf16 autocast on the CPU is emulated and many times *slower* than fp32
    (measured 5-20x on an AMD EPYC Zen 3; docs/performance.md).
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class Compute:
    """How a client computes: the autocast precision and the convolutions' memory format.

    ``precision="bf16"`` runs forward passes (training and evaluation) under
    ``torch.autocast`` with bfloat16 on CPU and CUDA; weights, gradients, optimizer state,
    the softmax/log-softmax/KL/cross-entropy and every reported loss stay fp32.
    ``channels_last`` stores 4-D weights and inputs channels-last (NHWC), which oneDNN's
    and cuDNN's convolutions may run faster; it changes the summation order only.
    """

    precision: str = "fp32"
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got '{self.precision}'")

    @classmethod
    def resolve(
        cls,
        precision: str = "fp32",
        memory_format: str = "auto",
        device: torch.device | str = "cpu",
        model: nn.Module | None = None,
    ) -> Compute:
        """The compute settings for ``device``: ``memory_format="auto"`` picks what was
        measured faster (``tools.bench precision``): channels-last for bf16 on a CPU with a
        convolutional ``model`` (faster on every CPU and CNN measured), contiguous otherwise
        (fp32 gains or loses depending on the CPU and model: opt in with
        ``channels_last`` where the bench says so). Warns once when bf16 is asked for on a
        CPU without native bf16.
        """
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(
                f"memory_format must be one of {MEMORY_FORMATS}, got '{memory_format}'"
            )
        device_type = torch.device(device).type
        if precision == "bf16" and device_type == "cpu" and not cpu_has_native_bf16():
            warn_slow_bf16()
        if memory_format == "auto":
            convolutional = model is None or any(isinstance(m, nn.Conv2d) for m in model.modules())
            channels_last = precision == "bf16" and device_type == "cpu" and convolutional
        else:
            channels_last = memory_format == "channels_last"
        return cls(precision, channels_last)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The forward pass's autocast context (a no-op in fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def model(self, model: nn.Module) -> nn.Module:
        """``model`` in this memory format (in place; returned for chaining)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of inputs in this memory format."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``model(x)`` under autocast, as fp32 logits."""
        with self.autocast(x.device):
            out = model(self.inputs(x))
        return out.float()


FP32 = Compute()
"""Plain fp32, contiguous: the default everywhere."""

_warned_bf16 = False


def warn_slow_bf16() -> None:
    """Warn (once per process) that bf16 on this CPU is emulated and slow."""
    global _warned_bf16
    if not _warned_bf16:
        _warned_bf16 = True
        warnings.warn(
            "train.precision=bf16 on a CPU without native bf16 instructions (AVX-512 BF16 "
            "or AMX): autocast is emulated and runs several times slower than fp32 here; "
            "use fp32 on this machine",
            RuntimeWarning,
            stacklevel=3,
        )


def kl_to_target(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    reduction: str = "batchmean",
    detach_teacher: bool = True,
) -> torch.Tensor:
    """KL(p_teacher || p_student), summed over classes and averaged over the batch
    (``batchmean``), or also divided by the number of classes (``mean``, PFLlib's
    ``nn.KLDivLoss()`` default).

    Computed in fp32 from log-probabilities on both sides (``log_target=True``): finite for
    any finite logits, however confident. The teacher is detached unless
    ``detach_teacher=False`` (PFLlib's variant, where it also receives gradient).
    """
    teacher = teacher_logits.detach() if detach_teacher else teacher_logits
    return _kl(
        F.log_softmax(student_logits.float(), dim=1),
        F.log_softmax(teacher.float(), dim=1),
        reduction,
    )


def _kl(log_p_student: torch.Tensor, log_p_teacher: torch.Tensor, reduction: str) -> torch.Tensor:
    """KL from log-probabilities; ``mean`` written as ``batchmean / classes`` (torch warns
    that its own ``mean`` will become ``batchmean`` in a future release).
    """
    if reduction not in ("batchmean", "mean"):
        raise ValueError(f"reduction must be 'batchmean' or 'mean', got '{reduction}'")
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl if reduction == "batchmean" else kl / log_p_student.shape[1]


@dataclass(frozen=True)
class MutualLosses:
    """The two losses of one batch and whether the meme's predictions were usable."""

    local: torch.Tensor
    meme: torch.Tensor
    meme_finite: torch.Tensor
    """0-dim bool tensor: False when the meme's log-probabilities held NaN/Inf (the local
    loss is then cross-entropy alone). A tensor, so that no device sync is needed."""


def mutual_loss_terms(
    local_logits: torch.Tensor,
    meme_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    beta: float,
    distillation: str = "faithful",
) -> MutualLosses:
    """The two FML losses of one batch, guarded against a non-finite meme.

    When the meme's log-probabilities are not all finite, the personalized model's loss is
    its cross-entropy alone and no gradient from the meme reaches it (the selections go
    through ``torch.where``, which passes exactly zero gradient to the branch not taken,
    where a multiplication by zero would pass ``0 * NaN = NaN``).
    """
    if distillation not in DISTILLATIONS:
        raise ValueError(f"distillation must be one of {DISTILLATIONS}, got '{distillation}'")
    faithful = distillation == "faithful"
    reduction = "batchmean" if faithful else "mean"
    zl, zm = local_logits.float(), meme_logits.float()
    log_pl, log_pm = F.log_softmax(zl, dim=1), F.log_softmax(zm, dim=1)
    ok = torch.isfinite(log_pm).all()
    # the local model's teacher: the meme, or (not finite) itself, which gives KL = 0
    meme_target = log_pm.detach() if faithful else log_pm
    teacher_for_local = torch.where(ok, meme_target, log_pl.detach())
    if faithful:
        teacher_for_meme = log_pl.detach()
    else:  # PFLlib: gradient flows into the local model too, unless the meme is corrupt
        teacher_for_meme = torch.where(ok, log_pl, log_pl.detach())
    kl_local = _kl(log_pl, teacher_for_local, reduction)
    kl_meme = _kl(log_pm, teacher_for_meme, reduction)
    ce_local = F.cross_entropy(zl, labels)
    loss_local = torch.where(ok, alpha * ce_local + (1 - alpha) * kl_local, ce_local)
    loss_meme = beta * F.cross_entropy(zm, labels) + (1 - beta) * kl_meme
    return MutualLosses(loss_local, loss_meme, ok)


def mutual_losses(
    local_logits: torch.Tensor,
    meme_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    beta: float,
    distillation: str = "faithful",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two FML losses ``(L_local, L_meme)`` for one batch (see
    :func:`mutual_loss_terms`).
    """
    terms = mutual_loss_terms(local_logits, meme_logits, labels, alpha, beta, distillation)
    return terms.local, terms.meme


def check_outputs(logits: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
    """Refuse, with one message naming the models, outputs that cannot be compared or
    scored: models whose numbers of outputs differ, or labels outside ``0..outputs-1``
    (checked on a training's first batch, before any step).
    """
    sizes = {name: int(z.shape[1]) if z.dim() == 2 else -1 for name, z in logits.items()}
    if any(size < 1 for size in sizes.values()):
        shapes = {name: tuple(z.shape) for name, z in logits.items()}
        raise ValueError(f"the models must output (batch, classes) logits, got {shapes}")
    low, high = int(labels.min()), int(labels.max())
    described = ", ".join(f"the {name} model outputs {n}" for name, n in sizes.items())
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"{described}: both must output one logit per class of the data (labels here go "
            f"up to {high}); build them with the same number of classes"
        )
    (classes,) = set(sizes.values())
    if low < 0 or high >= classes:
        raise ValueError(
            f"labels go from {low} to {high} but {described} classes: labels must be class "
            f"indices 0..{classes - 1}; build the models with {high + 1} outputs or fix the "
            "labels"
        )


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
    """``[loss_local, loss_meme, correct_local, correct_meme, nonfinite_meme_batches]``,
    the first four summed over examples."""
    mutual: bool = False
    """Whether a mutual-learning step filled it (then :meth:`means` reports the count of
    batches whose meme predictions were not finite)."""

    @torch.no_grad()
    def add(
        self,
        n: int,
        loss_local: torch.Tensor,
        loss_meme: torch.Tensor | None,
        local_logits: torch.Tensor,
        meme_logits: torch.Tensor | None,
        labels: torch.Tensor,
        meme_finite: torch.Tensor | None = None,
    ) -> None:
        """Add one batch of ``n`` examples (``meme_finite``: from a mutual step)."""
        self.examples += n
        zero = loss_local.new_zeros(())
        if meme_finite is not None:
            self.mutual = True
            # a corrupt meme's loss is not a number to average: count the batch instead
            loss_meme = None if loss_meme is None else torch.where(meme_finite, loss_meme, zero)
        row = torch.stack(
            [
                loss_local.detach().float() * n,
                zero if loss_meme is None else loss_meme.detach().float() * n,
                (local_logits.argmax(1) == labels).sum().float(),
                zero if meme_logits is None else (meme_logits.argmax(1) == labels).sum().float(),
                zero if meme_finite is None else (~meme_finite).float(),
            ]
        )
        self.sums = row if self.sums is None else self.sums + row

    def means(self) -> dict[str, float]:
        """Per-example means of the sums (and, after a mutual step, the number of batches
        whose meme predictions were not finite: ``meme_nonfinite_batches``).
        """
        n = max(self.examples, 1)
        sums = [0.0] * 5 if self.sums is None else self.sums.tolist()
        out = {
            "train_loss_local": sums[0] / n,
            "train_loss_meme": sums[1] / n,
            "train_acc_local": sums[2] / n,
            "train_acc_meme": sums[3] / n,
        }
        if self.mutual:
            out["meme_nonfinite_batches"] = sums[4]
        return out


Step = Callable[[torch.Tensor, torch.Tensor, "EpochStats"], None]
"""One optimization step on a batch ``(x, y)`` that adds what it saw to the stats."""


def resolve_last_batch(last_batch: str, distillation: str = "faithful") -> str:
    """``train.last_batch`` resolved: ``auto`` keeps the last incomplete batch, except in
    PFLlib's variant, which drops it (as its ``DataLoader(drop_last=True)``).
    """
    if last_batch == "auto":
        return "drop" if distillation == "pfllib" else "keep"
    return last_batch


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
    distillation: str = "faithful",
    compute: Compute = FP32,
) -> Step:
    """The deep-mutual-learning step of FML for one batch, as a :data:`Step`.

    ``update="simultaneous"`` (the FML reference): both models see the same batch, both
    losses use the partner's logits from before the step, both optimizers step.
    ``update="sequential"`` (the original DML): the local model steps first, then the
    meme learns from the updated local model's predictions on the same batch (that second
    forward pass runs in train mode, so BatchNorm statistics of the local model move twice
    per batch, as in DML implementations).

    ``distillation`` picks the loss (:data:`DISTILLATIONS`); ``pfllib`` is simultaneous by
    definition. ``compute`` sets the precision and memory format of the forward passes.
    """
    if update not in UPDATE_MODES:
        raise ValueError(f"update must be one of {UPDATE_MODES}, got '{update}'")
    if distillation not in DISTILLATIONS:
        raise ValueError(f"distillation must be one of {DISTILLATIONS}, got '{distillation}'")
    if distillation == "pfllib" and update != "simultaneous":
        raise ValueError(
            "distillation='pfllib' is PFLlib's simultaneous step: use update='simultaneous'"
        )
    alpha, beta = check_weight("alpha", alpha), check_weight("beta", beta)
    pfllib = distillation == "pfllib"
    checked = False

    def step(xb: torch.Tensor, yb: torch.Tensor, stats: EpochStats) -> None:
        nonlocal checked
        local.train()
        meme.train()
        local_logits = compute.forward(local, xb)
        meme_logits = compute.forward(meme, xb)
        if not checked:  # once, on the first batch: one clear message before any step
            check_outputs({"personalized": local_logits, "meme": meme_logits}, yb)
            checked = True
        if update == "simultaneous":
            terms = mutual_loss_terms(local_logits, meme_logits, yb, alpha, beta, distillation)
            opt_local.zero_grad(set_to_none=True)
            opt_meme.zero_grad(set_to_none=True)
            # faithful: the partners are detached, so the two graphs are disjoint and one
            # backward of the sum gives each model exactly the gradient of its own loss;
            # pfllib: the sum is what PFLlib's two backward calls accumulate.
            (terms.local + terms.meme).backward()
            if pfllib:
                nn.utils.clip_grad_norm_(local.parameters(), PFLLIB_CLIP_NORM)
                nn.utils.clip_grad_norm_(meme.parameters(), PFLLIB_CLIP_NORM)
            opt_local.step()
            opt_meme.step()
            loss_meme = terms.meme
        else:
            terms = mutual_loss_terms(local_logits, meme_logits, yb, alpha, beta)
            opt_local.zero_grad(set_to_none=True)
            terms.local.backward()
            opt_local.step()
            with torch.no_grad():
                teacher = compute.forward(local, xb)
            loss_meme = mutual_loss_terms(teacher, meme_logits, yb, alpha, beta).meme
            opt_meme.zero_grad(set_to_none=True)
            loss_meme.backward()
            opt_meme.step()
        stats.add(
            len(yb),
            terms.local.detach(),
            loss_meme.detach(),
            local_logits,
            meme_logits,
            yb,
            meme_finite=terms.meme_finite,
        )

    return step


def supervised_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    proximal_mu: float = 0.0,
    anchor: list[torch.Tensor] | None = None,
    compute: Compute = FP32,
) -> Step:
    """A cross-entropy step, plus ``mu/2 ||w - anchor||^2`` if ``proximal_mu > 0``.

    The proximal term is FedProx's (anchor = the global weights the round started from)
    and Ditto's (anchor = the global weights, for the personal model). ``anchor``
    defaults to the model's weights when the step is made. Losses are reported as
    ``train_loss_local``; the meme columns stay zero.
    """
    if proximal_mu > 0 and anchor is None:
        anchor = [p.detach().clone() for p in model.parameters()]
    checked = False

    def step(xb: torch.Tensor, yb: torch.Tensor, stats: EpochStats) -> None:
        nonlocal checked
        model.train()
        logits = compute.forward(model, xb)
        if not checked:
            check_outputs({"trained": logits}, yb)
            checked = True
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
    last_batch: str = "auto",
    distillation: str = "faithful",
    compute: Compute = FP32,
) -> EpochStats:
    """One epoch of deep mutual learning between ``local`` and ``meme``.

    ``data`` is ``(x, y)`` tensors (shuffled with ``generator`` and cut into batches of
    ``batch_size``) or an iterable of ``(x, y)`` batches such as a DataLoader. Labels may
    be any integer dtype. Returns the :class:`EpochStats` (``.means()`` gives the mean
    losses and accuracies of both models over the epoch). See :func:`mutual_step`.
    """
    step = mutual_step(local, meme, opt_local, opt_meme, alpha, beta, update, distillation, compute)
    return run_epochs(
        step, data, batch_size, 1, generator, resolve_last_batch(last_batch, distillation), stats
    )


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
    last_batch: str = "auto",
    compute: Compute = FP32,
) -> EpochStats:
    """One epoch of cross-entropy training (see :func:`supervised_step`)."""
    step = supervised_step(model, opt, proximal_mu, anchor, compute)
    return run_epochs(step, data, batch_size, 1, generator, resolve_last_batch(last_batch), stats)


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
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 512,
    compute: Compute = FP32,
) -> EvalResult:
    """Cross-entropy loss and accuracy of ``model`` on ``(x, y)`` in eval mode (the
    forward pass in ``compute``'s precision, the loss in fp32).
    """
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        logits = compute.forward(model, xb)
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
