"""Differential privacy of what leaves a client: Flower's wrappers and mods as used here.

Each test can fail: a clipping bound, a noise level, an epsilon, a budget, and the
personalized model that DP must not touch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp.exception import PrivacyBudgetExhausted
from torch import nn

from client_app.fml import train as fml_train
from client_app.mods import privacy_mod
from fml_flower.config import ConfigError, load_config, run_config_defaults
from fml_flower.settings import RoundSettings
from strategies import FedMutualLearning
from strategies.privacy import differential_privacy
from tests.conftest import new_run_id
from tests.test_strategy import _Grid, _reply


def _run_config(**overrides: object) -> dict:
    rc = {"experiment": "base", "overrides": "{}", **run_config_defaults()}
    rc.update(overrides)
    return rc


def _context(**overrides: object) -> Context:
    return Context(
        run_id=new_run_id(),
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=_run_config(**overrides),
    )


def _train_message(arrays: ArrayRecord, config: dict) -> Message:
    return Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord(config)}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )


def _norm(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))


# ------------------------------------------------------------------ client-side clipping


@pytest.mark.parametrize("scale", [0.01, 1.0, 50.0])
def test_client_side_clipping_bounds_every_update(scale: float) -> None:
    rng = np.random.default_rng(0)
    sent = {"w": rng.normal(size=(30, 20)).astype(np.float32), "b": np.zeros(20, np.float32)}
    clip = 0.5
    msg = _train_message(
        ArrayRecord({k: Array(v) for k, v in sent.items()}), {"clipping_norm": clip}
    )
    update = {k: rng.normal(size=v.shape).astype(np.float32) * scale for k, v in sent.items()}

    def client(m: Message, c: Context) -> Message:
        arrays = ArrayRecord({k: Array(sent[k] + update[k]) for k in sent})
        return Message(RecordDict({"arrays": arrays, "metrics": ConfigRecord()}), reply_to=m)

    raw = _norm({k: sent[k] + update[k] for k in sent}, sent)
    reply = privacy_mod(msg, _context(**{"privacy.mode": "client-fixed"}), client)
    assert not reply.has_error(), reply.error
    got = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    assert _norm(got, sent) <= clip * (1 + 1e-5)
    if raw <= clip:  # small updates pass unchanged
        assert _norm(got, sent) == pytest.approx(raw, rel=1e-5)
    # and with privacy off the same reply is not clipped (the test can tell)
    plain = privacy_mod(msg, _context(), client)
    assert _norm({k: v.numpy() for k, v in plain.content["arrays"].items()}, sent) == pytest.approx(
        raw, rel=1e-5
    )


def test_personalized_model_is_byte_identical_with_and_without_dp() -> None:
    """Client-side clipping touches the reply only: the personalized model (and its
    optimizer state) kept in ``context.state`` is the same bytes with and without it."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 4, (64,))

    def net(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))

    settings = RoundSettings(lr=0.5, local_epochs=2, batch_size=16, alpha=0.5, beta=0.5)
    global_arrays = ArrayRecord(net(1).state_dict())
    config = {"server-round": 1, **settings.to_config(), "clipping_norm": 1e-3}

    def run(mode: str) -> tuple[Context, Message]:
        ctx = _context(**{"privacy.mode": mode})

        def client(m: Message, c: Context) -> Message:
            reply = fml_train(
                m.content,
                c.state,
                meme=net(2),
                local=net(3),
                data=(x, y),
                generator=torch.Generator().manual_seed(5),
            )
            return Message(reply, reply_to=m)

        return ctx, privacy_mod(_train_message(global_arrays, config), ctx, client)

    (ctx_dp, reply_dp), (ctx_plain, reply_plain) = run("client-fixed"), run("none")
    assert not reply_dp.has_error(), reply_dp.error
    state_dp, state_plain = ctx_dp.state, ctx_plain.state
    assert sorted(state_dp.keys()) == sorted(state_plain.keys()) and len(state_dp.keys()) > 0
    for key in state_plain.keys():
        a, b = state_dp[key], state_plain[key]
        if isinstance(a, ArrayRecord):
            for k in b:
                assert a[k].data == b[k].data, f"{key}/{k} differs"
        else:
            assert dict(a) == dict(b), key
    # what was sent differs: the clipping did act on the meme
    sent = {k: v.numpy() for k, v in global_arrays.items()}
    dp = {k: v.numpy() for k, v in reply_dp.content["arrays"].items()}
    plain = {k: v.numpy() for k, v in reply_plain.content["arrays"].items()}
    assert _norm(dp, sent) <= 1e-3 * (1 + 1e-5) < _norm(plain, sent)


# ------------------------------------------------------------------ server side


def _big_reference(size: int = 200_000) -> ArrayRecord:
    return ArrayRecord(
        {"w": Array(np.zeros(size, np.float32)), "b": Array(np.zeros(3, np.float32))}
    )


def _round(wrapper, strategy, server_round: int, reference: ArrayRecord, nodes: list[int], deltas):
    msgs = list(wrapper.configure_train(server_round, reference, ConfigRecord(), _Grid(nodes)))
    replies = []
    for msg, delta in zip(msgs, deltas, strict=True):
        arrays = ArrayRecord(
            {
                k: Array(v.numpy() + np.asarray(delta.get(k, 0), dtype=v.numpy().dtype))
                for k, v in reference.items()
            }
        )
        replies.append(
            _reply(
                msg.metadata.dst_node_id, arrays, {"num-examples": 10 + msg.metadata.dst_node_id}
            )
        )
    return wrapper.aggregate_train(server_round, replies)


def _fml(**kw: object) -> FedMutualLearning:
    return FedMutualLearning(weighting="uniform", min_available_nodes=1, min_train_nodes=1, **kw)


def test_server_side_noise_has_the_configured_std() -> None:
    strategy = _fml()
    z, clip, n = 1.0, 2.0, 4
    wrapper = differential_privacy(
        strategy, mode="server-fixed", noise_multiplier=z, clipping_norm=clip, num_sampled_clients=n
    )
    reference = _big_reference()
    small = {"w": np.full(200_000, 1e-3, np.float32)}  # norm 0.45 < clip: not clipped
    arrays, _ = _round(wrapper, strategy, 1, reference, [1, 2, 3, 4], [small] * n)
    noise = arrays["w"].numpy().astype(np.float64) - 1e-3
    assert noise.std() == pytest.approx(z * clip / n, rel=0.02)
    assert abs(noise.mean()) < 0.01


def test_adaptive_noise_uses_the_norm_the_updates_were_clipped_with() -> None:
    """Flower's adaptive wrappers move the clipping norm before they add noise; the noise
    must follow the norm used for clipping (Andrew et al.)."""
    # Flower draws both noises from numpy's global generator: a seed for which the norm
    # moves by more than the 2 % the std check can tell apart (seeds 2, 4, 5 do)
    np.random.seed(4)
    strategy = _fml()
    n, z, clip = 4, 1.0, 2.0
    wrapper = differential_privacy(
        strategy,
        mode="server-adaptive",
        noise_multiplier=z,
        clipping_norm=clip,
        num_sampled_clients=n,
        clipped_count_stddev=1.0,
    )
    z_update = (z**-2 - (2 * 1.0) ** -2) ** -0.5  # Flower's split of z
    small = {"w": np.full(200_000, 1e-3, np.float32)}
    arrays, _ = _round(wrapper, strategy, 1, _big_reference(), [1, 2, 3, 4], [small] * n)
    assert wrapper.clipping_norm != pytest.approx(clip, rel=0.02)  # the norm did move
    std = (arrays["w"].numpy().astype(np.float64) - 1e-3).std()
    assert std == pytest.approx(z_update * clip / n, rel=0.02)


def test_server_side_clipping_bounds_each_contribution() -> None:
    strategy = _fml()
    wrapper = differential_privacy(
        strategy,
        mode="server-fixed",
        noise_multiplier=0.0,
        clipping_norm=1.0,
        num_sampled_clients=2,
    )
    reference = ArrayRecord({"w": Array(np.zeros(100, np.float32))})
    big = {"w": np.full(100, 10.0, np.float32)}  # norm 100
    arrays, _ = _round(wrapper, strategy, 1, reference, [1, 2], [big, big])
    assert np.linalg.norm(arrays["w"].numpy()) == pytest.approx(1.0, rel=1e-5)
    assert strategy.round_log(1).update_norms == {1: pytest.approx(100.0), 2: pytest.approx(100.0)}
    assert strategy.round_log(1).privacy["privacy_epsilon"] is None  # no noise: not private


def test_epsilon_grows_with_rounds_and_matches_the_accountant() -> None:
    import dp_accounting

    strategy = _fml()
    z, n, delta = 1.0, 4, 1e-5
    wrapper = differential_privacy(
        strategy,
        mode="server-fixed",
        noise_multiplier=z,
        clipping_norm=1.0,
        num_sampled_clients=n,
        population_size=n,
        delta=delta,
    )
    reference = ArrayRecord({"w": Array(np.zeros(10, np.float32))})
    epsilons = []
    for r in (1, 2, 3):
        _round(wrapper, strategy, r, reference, [1, 2, 3, 4], [{"w": np.ones(10, np.float32)}] * n)
        epsilons.append(strategy.round_log(r).privacy["privacy_epsilon"])
    assert epsilons[0] < epsilons[1] < epsilons[2]
    for rounds, eps in enumerate(epsilons, start=1):  # Google's RDP accountant, directly
        acc = dp_accounting.rdp.RdpAccountant()
        acc.compose(dp_accounting.GaussianDpEvent(z), rounds)
        assert eps == pytest.approx(acc.get_epsilon(delta), rel=1e-6)
    assert epsilons[0] == pytest.approx(4.7285, abs=1e-3)  # z = 1, delta 1e-5, one release


def test_a_round_with_a_missing_reply_releases_nothing() -> None:
    strategy = _fml()
    wrapper = differential_privacy(
        strategy,
        mode="server-fixed",
        noise_multiplier=1.0,
        clipping_norm=1.0,
        num_sampled_clients=3,
    )
    reference = ArrayRecord({"w": Array(np.zeros(10, np.float32))})
    msgs = list(wrapper.configure_train(1, reference, ConfigRecord(), _Grid([1, 2, 3])))
    moved = ArrayRecord({"w": Array(np.ones(10, np.float32))})
    replies = [_reply(m.metadata.dst_node_id, moved, {"num-examples": 5}) for m in msgs[:2]]
    replies.append(_reply(msgs[2].metadata.dst_node_id, None, None, error="node died"))
    arrays, metrics = wrapper.aggregate_train(1, replies)
    assert arrays is None and metrics is not None
    book = strategy.round_log(1)
    assert book.privacy["privacy_released"] == 0.0 and wrapper.epsilon() == 0.0  # nothing spent
    assert book.aggregated is False and len(book.train_dropped) == 1


def test_malformed_replies_are_dropped_before_flower_clips_them() -> None:
    strategy = _fml()
    wrapper = differential_privacy(
        strategy,
        mode="server-fixed",
        noise_multiplier=0.0,
        clipping_norm=1.0,
        num_sampled_clients=2,
    )
    reference = ArrayRecord(
        {"a": Array(np.zeros(3, np.float32)), "b": Array(np.zeros(2, np.float32))}
    )
    list(wrapper.configure_train(1, reference, ConfigRecord(), _Grid([1, 2])))
    reordered = ArrayRecord(
        {"b": Array(np.ones(2, np.float32)), "a": Array(np.zeros(3, np.float32))}
    )
    wrong = ArrayRecord({"a": Array(np.zeros(4, np.float32)), "b": Array(np.zeros(2, np.float32))})
    ok = wrapper.aggregate_train(
        1, [_reply(1, reordered, {"num-examples": 5}), _reply(2, reordered, {"num-examples": 5})]
    )[0]
    assert list(ok.keys()) == ["a", "b"]  # reordered as sent, then clipped by position
    assert np.allclose(ok["b"].numpy(), 1 / math.sqrt(2))  # (1, 1) clipped to norm 1
    assert np.allclose(ok["a"].numpy(), 0.0)
    list(wrapper.configure_train(2, reference, ConfigRecord(), _Grid([1, 2])))
    arrays, _ = wrapper.aggregate_train(
        2, [_reply(1, wrong, {"num-examples": 5}), _reply(2, reference, {"num-examples": 5})]
    )  # one reply of the wrong shape, one equal to the global model (a zero update)
    dropped = strategy.round_log(2).train_dropped
    assert arrays is None and "is float32[4]" in dropped[0] and "exactly zero" in dropped[1]


def test_a_budget_stops_before_the_round_that_would_exceed_it() -> None:
    strategy = _fml()
    wrapper = differential_privacy(
        strategy,
        mode="server-fixed",
        noise_multiplier=1.0,
        clipping_norm=1.0,
        num_sampled_clients=2,
        max_epsilon=8.0,  # z = 1: 4.73 after one round, 7.08 after two, 9.01 after three
    )
    reference = ArrayRecord({"w": Array(np.zeros(10, np.float32))})
    for r in (1, 2):
        _round(wrapper, strategy, r, reference, [1, 2], [{"w": np.ones(10, np.float32)}] * 2)
    with pytest.raises(PrivacyBudgetExhausted, match="max_epsilon=8"):
        list(wrapper.configure_train(3, reference, ConfigRecord(), _Grid([1, 2])))
    resumed = differential_privacy(
        _fml(),
        mode="server-fixed",
        noise_multiplier=1.0,
        clipping_norm=1.0,
        num_sampled_clients=2,
        prior_releases=2,
    )
    assert resumed.epsilon() == pytest.approx(wrapper.epsilon())


def test_dp_needs_uniform_weights() -> None:
    with pytest.raises(ValueError, match="uniform"):
        differential_privacy(
            FedMutualLearning(),
            mode="server-fixed",
            noise_multiplier=1.0,
            clipping_norm=1.0,
            num_sampled_clients=2,
        )


def test_dp_refuses_a_robust_rule_and_seeds_its_noise_on_request() -> None:
    with pytest.raises(ValueError, match=r"aggregator=Median\(\): the noise and the accountant"):
        differential_privacy(
            _fml(aggregator="median"),
            mode="server-fixed",
            noise_multiplier=1.0,
            clipping_norm=1.0,
            num_sampled_clients=2,
        )
    small = {"w": np.full(200_000, 1e-3, np.float32)}
    noises = []
    for seed in (7, 7, 8):
        strategy = _fml()
        wrapper = differential_privacy(
            strategy,
            mode="server-fixed",
            noise_multiplier=1.0,
            clipping_norm=1.0,
            num_sampled_clients=2,
            noise_seed=seed,
        )
        arrays, _ = _round(wrapper, strategy, 1, _big_reference(), [1, 2], [small] * 2)
        noises.append(arrays["w"].numpy())
    assert np.array_equal(noises[0], noises[1])  # the same seed: the same noise
    assert not np.array_equal(noises[0], noises[2])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"privacy.mode": "server-fixed", "train.method": "local"}, "sends no model"),
        ({"privacy.mode": "server-fixed", "aggregation.rule": "median"}, "calibrated to the mean"),
        ({"privacy.mode": "server-fixed", "aggregation.weighting": "examples"}, "uniform"),
        ({"privacy.max_epsilon": 3.0}, "privacy.mode other than none"),
        (
            {
                "privacy.mode": "client-fixed",
                "privacy.noise_multiplier": 0.0,
                "privacy.max_epsilon": 3.0,
            },
            "noise_multiplier > 0",
        ),
        ({"privacy.mode": "laplace"}, "privacy.mode"),
        ({"attack.kind": "scale"}, "name the attacking clients"),
    ],
)
def test_privacy_configuration_is_checked(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("base", overrides)


@pytest.mark.simulation
def test_a_private_run_in_simulation_stops_cleanly_at_its_budget(tmp_path) -> None:
    """Client-side clipping through the real ClientApp (Flower's fixedclipping_mod), the
    server's wrapper and accountant, and the budget: z = 1 at delta 1e-3 spends 3.54 in
    round 1 and 5.42 by round 2 (7.00 by round 3), so a budget of 6 stops the run before
    round 3."""
    import json
    from pathlib import Path

    from tools.launch import run_app, run_status, simulation_superlink

    root = Path(__file__).resolve().parent.parent
    flwr_home, out = tmp_path / "flwr", tmp_path / "outputs"
    with simulation_superlink(flwr_home, cwd=tmp_path) as (connection, _):
        proc = run_app(
            root,
            flwr_home,
            connection,
            {
                "federation.num_rounds": 4,
                "data.partitioner": "shard",
                "model.meme": "mlp",
                "model.local": "mlp",
                "privacy.mode": "client-fixed",
                "privacy.noise_multiplier": 1.0,
                "privacy.clipping_norm": 0.5,
                "privacy.delta": 1e-3,
                "privacy.max_epsilon": 6.0,
                "output.dir": str(out),
                "output.run_name": "dp",
            },
            num_supernodes=2,
            timeout=600,
        )
        status = run_status(flwr_home, connection)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert status and status[-1]["status"] == "finished:completed", (status, log[-3000:])
    metrics = json.loads((out / "dp" / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2], log[-3000:]
    assert "privacy budget exhausted" in metrics["run"]["stopped"]
    eps = [r["privacy_epsilon"] for r in rounds[1:]]
    assert eps == [pytest.approx(3.5366, abs=1e-3), pytest.approx(5.4200, abs=1e-3)]
    assert all(r["privacy_released"] == 1.0 for r in rounds[1:])
    for r in rounds[1:]:  # every meme update the clients sent was clipped to 0.5
        assert r["update_norm_max"] <= 0.5 * (1 + 1e-4), r["update_norms"]
        assert r["clients_trained"] == 2 and r["replies_dropped"] == 0
    assert "privacy budget exhausted" in log
    # the last round was scored by the clients before the run ended (in-train evaluation)
    assert isinstance(rounds[-1]["personal_acc"], float) and rounds[-1]["clients_evaluated"] == 2
    assert "[round 2, scored by its clients as the run stops]" in log


def test_private_keys_are_neither_sent_nor_clipped_nor_noised() -> None:
    """FedPer's head (private keys) stays out of what the DP wrapper clips and noises:
    only the body is sent, compared with what was sent, and released."""
    from strategies import FedPer

    strategy = FedPer(
        private_keys=["head"], weighting="uniform", min_available_nodes=1, min_train_nodes=1
    )
    wrapper = differential_privacy(
        strategy,
        mode="server-fixed",
        noise_multiplier=1.0,
        clipping_norm=1.0,
        num_sampled_clients=2,
    )
    full = ArrayRecord(
        {"body": Array(np.zeros(1000, np.float32)), "head": Array(np.full(3, 7.0, np.float32))}
    )
    msgs = list(wrapper.configure_train(1, full, ConfigRecord(), _Grid([1, 2])))
    assert all(list(m.content["arrays"].keys()) == ["body"] for m in msgs)
    body = ArrayRecord({"body": Array(np.full(1000, 0.01, np.float32))})
    arrays, _ = wrapper.aggregate_train(1, [_reply(i, body, {"num-examples": 5}) for i in (1, 2)])
    assert list(arrays.keys()) == ["body"]  # the head is never released
    noise = arrays["body"].numpy().astype(np.float64) - 0.01
    assert noise.std() == pytest.approx(1.0 * 1.0 / 2, rel=0.1)


def test_the_wrapper_answers_the_per_client_questions_of_the_strategy_it_wraps() -> None:
    """A plug-in user keeps only the wrapper: results, logs and failures are reachable."""
    strategy = _fml()
    wrapper = differential_privacy(
        strategy,
        mode="server-fixed",
        noise_multiplier=1.0,
        clipping_norm=1.0,
        num_sampled_clients=2,
    )
    strategy.round_log(1).train_clients = {3: {"alpha": 0.5}}
    assert wrapper.round_log(1).train_clients == {3: {"alpha": 0.5}}
    assert wrapper.client_results() == strategy.client_results()
    assert wrapper.persistent_failures() == strategy.persistent_failures()
