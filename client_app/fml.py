"""FML on the client, for any Flower app: one function per message type.

In your ClientApp::

    from client_app.fml import evaluate as fml_evaluate, train as fml_train

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = fml_train(msg.content, context, meme=MemeNet(), local=MyNet(),
                          data=(x_train, y_train))
        return Message(reply, reply_to=msg)

``msg.content`` is what :class:`strategies.FedMutualLearning` sent (the global arrays and a
ConfigRecord with ``lr``, ``local-epochs``, ``batch-size``, ``momentum``,
``weight-decay``, ``alpha``, ``beta``, ``distillation``, ``round``); ``context`` gives the
client's partition id (named in its replies and errors) and its ``context.state``, which
keeps the personalized model and its optimizer between rounds. Nothing else is needed: no
architecture name, no learning rate, no config of your own. With many clients, pass
``state=NodeStore.from_context(context)`` (:class:`client_app.state.NodeStore`): the
models then live in one node-local file per client and ``context.state`` only names it.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
from torch import nn

from client_app.errors import naming_partition
from client_app.state import ContextStore, NodeStore
from fml_flower.personal import PERSONAL, PersonalStore, cpu_state, load_model, save_model
from fml_flower.settings import RoundSettings
from fml_flower.training import (
    Batches,
    Compute,
    as_labels,
    mutual_step,
    resolve_last_batch,
    run_epochs,
    sgd,
)
from fml_flower.training import evaluate as evaluate_model
from strategies.robust import EVAL_PREFIX, EVALUATE_BEFORE_TRAIN

State = Context | RecordDict | PersonalStore
"""Where the personalized model lives: a ``Context`` (its ``context.state``), a
``context.state``, or a store such as :class:`client_app.state.NodeStore`."""


def _store(state: State) -> PersonalStore:
    if isinstance(state, Context):
        return ContextStore(state.state)
    return ContextStore(state) if isinstance(state, RecordDict) else state


def _partition(state: State) -> int | None:
    """The client's partition id, where ``state`` tells it."""
    if isinstance(state, Context):
        pid = state.node_config.get("partition-id")
        return int(pid) if isinstance(pid, int | float | str) and str(pid).isdigit() else None
    return getattr(state, "partition_id", None)


def used_settings(s: RoundSettings) -> dict[str, float]:
    """The round's values a client trained with, for its reply's metrics (``lr``, and FML's
    ``alpha`` and ``beta``): recorded by the server with each client's training metrics.
    """
    out = {"lr": s.lr}
    if s.alpha is not None and s.beta is not None:
        out.update(alpha=s.alpha, beta=s.beta)
    return out


def train(
    content: RecordDict,
    state: State,
    *,
    meme: nn.Module,
    local: nn.Module,
    data: Batches,
    update: str = "simultaneous",
    last_batch: str = "auto",
    generator: torch.Generator | None = None,
    test: Batches | None = None,
    precision: str = "fp32",
    memory_format: str = "auto",
    seed: int | None = 0,
) -> RecordDict:
    """One FML round: the reply to a training message of ``FedMutualLearning``.

    Parameters
    ----------
    content : RecordDict
        The message's content: the global arrays (``"arrays"``) and the round's config
        (``"config"``).
    state : Context | RecordDict | PersonalStore
        The node's ``context`` (or its ``context.state``): the personalized model and its
        optimizer state are restored from ``context.state`` (created on the first round)
        and stored back; with the context, the client's partition id (node config
        ``partition-id``) goes into the reply's metrics (``partition_id``, the key of the
        server's per-client results) and into any error it raises. Or
        ``NodeStore.from_context(context)`` (:class:`client_app.state.NodeStore`: the state
        in a node-local file, written at the end of this call; ``context.state`` then holds
        only its name and checksum).
    meme : nn.Module
        A model of the global architecture; it receives the global weights and gets a
        fresh optimizer.
    local : nn.Module
        This client's personalized model, any architecture; freshly built (its weights are
        replaced by the stored ones from the second round on, and a model of another
        architecture than the stored one is refused).
    data : tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]]
        The client's training data: ``(x, y)`` tensors (shuffled and batched with the
        strategy's ``batch-size``) or a DataLoader (used as it is). Labels: any integer dtype.
    update : str (default: "simultaneous")
        ``simultaneous`` (FML) or ``sequential`` (the original DML).
    last_batch : str (default: "auto")
        With tensors: ``keep``, ``drop`` or ``merge`` the last incomplete batch; ``auto``
        keeps it, except with the strategy's ``distillation="pfllib"`` (dropped, as PFLlib).
    generator : Optional[torch.Generator]
        The batch order's generator (with tensors); by default one seeded from ``seed``.
    seed : Optional[int] (default: 0)
        Without ``generator``: the batch order is drawn from ``seed``, the client's
        partition id and the round, so two runs of the same app give the same numbers
        (with your models' initial weights seeded too). None: torch's global generator
        (which, in a simulation, depends on which worker serves the client).
    test : Optional[tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]]]
        The client's test data. Needed when the strategy evaluates in the training
        message (``FedMutualLearning(evaluate_in_train=True)``: one message per round):
        from its second round on, the client then scores the received global model and
        its personalized model on it *before* training, as :func:`evaluate` would have
        for the previous round, and adds them to the reply prefixed ``eval.``.
    precision : str (default: "fp32")
        ``fp32`` or ``bf16`` (forward passes under bfloat16 autocast; weights, optimizer
        state and losses in fp32). Slower on a CPU without native bf16 (a warning says so).
    memory_format : str (default: "auto")
        ``contiguous``, ``channels_last`` or ``auto`` (channels-last for bf16 on a CPU).

    Returns
    -------
    RecordDict
        ``"arrays"``: the meme's state dict (parameters and buffers) only; ``"metrics"``:
        ``num-examples``, the mean training losses and accuracies of both models,
        ``meme_nonfinite_batches`` (batches whose meme predictions were NaN/Inf: trained
        on the labels alone), the ``lr``/``alpha``/``beta`` it used and ``partition_id``.

    Raises
    ------
    Exception
        Any error of the round; when the partition id is known, its message starts with
        ``partition <i>: <ExceptionType>:`` (the server shows it in one line). E.g. models
        whose outputs differ in size, or labels beyond them, raise ``ValueError`` on the
        first batch, before any step.
    """
    with naming_partition(_partition(state)):
        return _train(
            content,
            state,
            meme=meme,
            local=local,
            data=data,
            update=update,
            last_batch=last_batch,
            generator=generator,
            test=test,
            precision=precision,
            memory_format=memory_format,
            seed=seed,
        )


def _train(
    content: RecordDict,
    state: State,
    *,
    meme: nn.Module,
    local: nn.Module,
    data: Batches,
    update: str,
    last_batch: str,
    generator: torch.Generator | None,
    test: Batches | None,
    precision: str,
    memory_format: str,
    seed: int | None,
) -> RecordDict:
    s = RoundSettings.from_config(content["config"], fml=True)  # type: ignore[arg-type]
    if generator is None and seed is not None:
        pid = _partition(state) or 0
        generator = torch.Generator().manual_seed(seed + 7919 * (pid + 1) + 104729 * s.round)
    scored: dict[str, float | int] = {}
    if content["config"].get(EVALUATE_BEFORE_TRAIN):  # type: ignore[union-attr]
        if test is None:
            raise ValueError(
                "the strategy evaluates in the training message (evaluate_in_train=True): "
                "pass the client's test data as test=(x_test, y_test)"
            )
        if _store(state).load(PERSONAL) is not None:  # not before the client's first round
            reply = evaluate(content, state, meme=meme, local=local, data=test)
            scored = {EVAL_PREFIX + k: v for k, v in reply["metrics"].items()}  # type: ignore[union-attr]
    meme.load_state_dict(content["arrays"].to_torch_state_dict())  # type: ignore[union-attr]
    device = next(meme.parameters()).device
    compute = Compute.resolve(precision, memory_format, device)
    compute.model(meme)
    compute.model(local.to(device))
    store = _store(state)
    opt_meme = sgd(meme, s.lr, s.momentum, s.weight_decay)  # fresh momentum every round
    opt_local = sgd(local, s.lr, s.momentum, s.weight_decay)
    load_model(store, PERSONAL, local, opt_local)  # keeps this round's lr
    distillation = s.distillation or "faithful"
    step = mutual_step(
        local,
        meme,
        opt_local,
        opt_meme,
        s.alpha,
        s.beta,
        update,
        distillation,
        compute,  # type: ignore[arg-type]
    )
    policy = resolve_last_batch(last_batch, distillation)
    stats = run_epochs(step, data, s.batch_size, s.local_epochs, generator, policy)
    save_model(store, PERSONAL, local, opt_local)
    if isinstance(store, NodeStore):
        store.flush(s.round)
    metrics = {**stats.means(), "num-examples": stats.examples // s.local_epochs}
    metrics.update(used_settings(s))
    pid = _partition(state)
    if pid is not None:
        metrics["partition_id"] = pid
    metrics.update(scored)
    return RecordDict({"arrays": ArrayRecord(cpu_state(meme)), "metrics": MetricRecord(metrics)})


def evaluate(
    content: RecordDict,
    state: State,
    *,
    meme: nn.Module,
    local: nn.Module,
    data: Batches,
) -> RecordDict:
    """The reply to an evaluation message: the global model and (once this client has
    trained) its personalized model on ``data``, as ``global_acc``/``global_loss``,
    ``personal_acc``/``personal_loss`` and ``num-examples`` (and ``partition_id`` where
    ``state`` tells it: a ``Context`` or a ``NodeStore``).
    """
    with naming_partition(_partition(state)):
        reply = _evaluate(content, state, meme=meme, local=local, data=data)
    pid = _partition(state)
    if pid is not None:
        reply["metrics"]["partition_id"] = pid  # type: ignore[index]
    return reply


def _evaluate(
    content: RecordDict,
    state: State,
    *,
    meme: nn.Module,
    local: nn.Module,
    data: Batches,
) -> RecordDict:
    meme.load_state_dict(content["arrays"].to_torch_state_dict())  # type: ignore[union-attr]
    device = next(meme.parameters()).device
    x, y = _all(data)
    metrics: dict[str, float | int] = {"num-examples": len(y)}
    g = evaluate_model(meme, x.to(device), y.to(device))
    metrics.update(global_acc=g.accuracy, global_loss=g.loss)
    if load_model(_store(state), PERSONAL, local.to(device)):
        p = evaluate_model(local, x.to(device), y.to(device))
        metrics.update(personal_acc=p.accuracy, personal_loss=p.loss)
    return RecordDict({"metrics": MetricRecord(metrics)})


def _all(data: Batches) -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``data`` as two tensors, in order (no shuffling), labels as int64."""
    if isinstance(data, tuple) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        x, y = data
    else:
        batches = list(data)  # type: ignore[arg-type]
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    return x, as_labels(y)
