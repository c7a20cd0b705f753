"""The methods' defining properties, checked against references written by hand.

Each reference below is plain PyTorch written from the method's definition (not from our
code) and fed the exact batches the client uses (one batch per epoch: the batch size is
larger than the train part, in the order the client's generator draws).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client_app import fml as public_fml
from client_app.app import ClientDataCache, client_config
from client_app.app import train as app_train
from client_app.state import ContextStore, NodeStore, node_slot
from fml_flower.methods import METHODS
from fml_flower.methods.base import seed_for
from fml_flower.models import build_model, head_keys
from fml_flower.personal import PERSONAL
from fml_flower.settings import RoundSettings
from fml_flower.training import EpochStats, mutual_step
from tests.conftest import new_run_id

PID, N = 2, 10
BIG_BATCH = 4096  # larger than any train part here: one batch per epoch
LRS = (0.1, 0.03)  # round 2 with a decayed lr: the client must use the one it is sent
MOMENTUM = 0.9


def _context(method: str) -> Context:
    run_config = {
        "experiment": "base",
        "train.method": method,
        "model.meme": "mlp",
        "model.local": "mlp",
    }
    return Context(
        new_run_id(), 7, {"partition-id": PID, "num-partitions": N}, RecordDict(), run_config
    )


def _train_message(arrays: dict[str, torch.Tensor], server_round: int, **fml: float) -> Message:
    settings = RoundSettings(
        lr=LRS[server_round - 1],
        local_epochs=1,
        batch_size=BIG_BATCH,
        momentum=MOMENTUM,
        round=server_round,
        **fml,  # type: ignore[arg-type]
    )
    config = ConfigRecord({"server-round": server_round, **settings.to_config()})
    content = RecordDict({"arrays": ArrayRecord(arrays), "config": config})
    return Message(content, dst_node_id=7, message_type=MessageType.TRAIN)


def _mlp(seed: int) -> torch.nn.Module:
    return build_model("mlp", (1, 28, 28), 10, seed=seed)


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _client_batches(context: Context, server_round: int, draws: int = 1):
    """The client's train part, in the order(s) its round generator shuffles it."""
    cfg = client_config(context)
    data, _ = ClientDataCache().get(cfg, PID, N, None)
    x, y = data.train.x, data.train.y
    assert len(y) < BIG_BATCH
    gen = torch.Generator().manual_seed(seed_for(cfg, PID, server_round))
    orders = [torch.randperm(len(y), generator=gen) for _ in range(draws)]
    return cfg, [(x[o], y[o]) for o in orders]


# ------------------------------------------------------------------ FML's two optimizers


def _fml_reference(
    local0: torch.nn.Module,
    globals_: list[dict[str, torch.Tensor]],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    personal_momentum: str = "carried",
    meme_momentum: str = "fresh",
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two FML rounds by hand: one SGD optimizer for the personalized model, alive across
    rounds (``personal_momentum="fresh"``: a new one each round); a new one for each
    round's meme (``meme_momentum="carried"``: the first round's momentum carried over).
    """
    local = copy.deepcopy(local0)
    opt_local = torch.optim.SGD(local.parameters(), lr=LRS[0], momentum=MOMENTUM)
    opt_meme_prev = None
    memes = []
    for r, (g, (xb, yb)) in enumerate(zip(globals_, batches, strict=True)):
        if personal_momentum == "fresh":
            opt_local = torch.optim.SGD(local.parameters(), lr=LRS[r], momentum=MOMENTUM)
        for group in opt_local.param_groups:
            group["lr"] = LRS[r]
        meme = _mlp(0)
        meme.load_state_dict(g)
        opt_meme = torch.optim.SGD(meme.parameters(), lr=LRS[r], momentum=MOMENTUM)
        if meme_momentum == "carried" and opt_meme_prev is not None:
            opt_meme.load_state_dict(opt_meme_prev.state_dict())
            for group in opt_meme.param_groups:
                group["lr"] = LRS[r]
        mutual_step(local, meme, opt_local, opt_meme, 0.5, 0.5)(xb, yb, EpochStats())
        memes.append(_state(meme))
        opt_meme_prev = opt_meme
    return _state(local), memes


def test_fml_meme_optimizer_is_fresh_and_personal_momentum_carries_over() -> None:
    """Through the ClientApp: round 2's personalized model continues round 1's SGD
    (momentum kept, the new lr used); each round's meme starts a new optimizer.
    """
    context = _context("fml")
    g1, g2 = _state(_mlp(0)), _state(_mlp(5))  # round 2's global: any other weights
    replies = []
    for r, g in ((1, g1), (2, g2)):
        reply = app_train(_train_message(g, r, alpha=0.5, beta=0.5), context)
        replies.append(reply.content["arrays"].to_torch_state_dict())
    saved = node_slot(context.state, PERSONAL)
    assert saved is not None

    cfg, b1 = _client_batches(context, 1)
    _, b2 = _client_batches(context, 2)
    local0 = _mlp(seed_for(cfg, PID))  # the client's own initialization
    personal, memes = _fml_reference(local0, [g1, g2], b1 + b2)
    assert _close(saved.state, personal)
    assert _close(replies[0], memes[0]) and _close(replies[1], memes[1])
    # the references that would be wrong differ from what the client did
    fresh_personal, _ = _fml_reference(local0, [g1, g2], b1 + b2, personal_momentum="fresh")
    _, carried_memes = _fml_reference(local0, [g1, g2], b1 + b2, meme_momentum="carried")
    assert not _close(saved.state, fresh_personal)
    assert not _close(replies[1], carried_memes[1])


@pytest.mark.parametrize("where", ["context.state", "NodeStore"])
def test_public_fml_round_has_the_same_optimizers(where: str, tmp_path: Path) -> None:
    """The public client function (for other Flower apps) behaves the same, with the state
    in ``context.state`` or in a node-local file (:class:`NodeStore`)."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,))
    local0, g1, g2 = _mlp(11), _state(_mlp(0)), _state(_mlp(5))
    context_state = RecordDict()
    state = context_state if where == "context.state" else NodeStore(context_state, tmp_path, 0, {})
    replies, batches = [], []
    for r, g in ((1, g1), (2, g2)):
        gen = torch.Generator().manual_seed(100 + r)
        order = torch.randperm(40, generator=torch.Generator().manual_seed(100 + r))
        batches.append((x[order], y[order]))
        content = _train_message(g, r, alpha=0.5, beta=0.5).content
        local = copy.deepcopy(local0) if r == 1 else _mlp(99)  # round 2: restored over it
        reply = public_fml.train(
            content, state, meme=_mlp(0), local=local, data=(x, y), generator=gen
        )
        replies.append(reply["arrays"].to_torch_state_dict())
    if where == "NodeStore":
        assert not context_state.array_records  # only the file's name and checksum
        saved = node_slot(context_state, PERSONAL)
    else:
        saved = ContextStore(context_state).load(PERSONAL)
    assert saved is not None
    personal, memes = _fml_reference(local0, [g1, g2], batches)
    assert _close(saved.state, personal)
    assert _close(replies[1], memes[1])
    fresh_personal, _ = _fml_reference(local0, [g1, g2], batches, personal_momentum="fresh")
    assert not _close(saved.state, fresh_personal)


# ------------------------------------------------------------------ FedRep


def _fedrep_reference(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], head_first: bool
) -> dict[str, torch.Tensor]:
    """One FedRep round by hand: the head (body frozen), then the body (head frozen),
    each a plain cross-entropy SGD epoch with its own optimizer.
    """
    head = set(head_keys(model))
    params = dict(model.named_parameters())
    phases = [sorted(head), sorted(set(params) - head)]
    if not head_first:
        phases.reverse()
    for keys, (xb, yb) in zip(phases, batches, strict=True):
        for name, p in params.items():
            p.requires_grad_(name in keys)
        opt = torch.optim.SGD([params[k] for k in keys], lr=LRS[0], momentum=MOMENTUM)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in params.values():
        p.requires_grad_(True)
    return _state(model)


def test_fedrep_trains_the_head_then_the_body_and_sends_only_the_body() -> None:
    context = _context("fedrep")
    cfg, batches = _client_batches(context, 1, draws=2)  # the two phases share the generator
    start = _mlp(seed_for(cfg, PID))  # the client's own model (its head is kept)
    head = head_keys(start)
    received = {k: v for k, v in _state(_mlp(0)).items() if k not in head}  # the global body
    start.load_state_dict(received, strict=False)

    reply = app_train(_train_message(received, 1), context)
    sent = reply.content["arrays"].to_torch_state_dict()
    saved = node_slot(context.state, PERSONAL)
    assert saved is not None

    expected = _fedrep_reference(copy.deepcopy(start), batches, head_first=True)
    assert set(sent) == set(received)  # only the body leaves the client
    assert _close(sent, {k: expected[k] for k in received})
    assert _close(saved.state, expected)
    # the defining order matters: body-first (or FedPer's joint step) gives other weights
    body_first = _fedrep_reference(copy.deepcopy(start), batches, head_first=False)
    assert not _close(saved.state, body_first)
    joint = _train_fedper(received)
    assert not _close(saved.state, joint)


def _train_fedper(received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    context = _context("fedper")
    app_train(_train_message(received, 1), context)
    saved = node_slot(context.state, PERSONAL)
    assert saved is not None
    return saved.state


def test_fedrep_is_one_registry_entry() -> None:
    method = METHODS["fedrep"]
    assert method.name == "fedrep" and method.strategy == "strategies.baselines:FedPer"
    assert not method.has_global_model


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_names_a_strategy_that_imports(name: str) -> None:
    import importlib

    module, _, cls = METHODS[name].strategy.partition(":")
    assert isinstance(getattr(importlib.import_module(module), cls), type)
