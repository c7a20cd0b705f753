"""A BatchNorm meme (``resnet18``) through a real 2-round simulation: its running
statistics travel with the meme and are averaged like the weights (example-weighted),
its integer counter stays an integer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from client_app.app import evaluate, train
from fml_flower.checkpoint import load_checkpoint
from fml_flower.config import load_config
from server_app.app import run_fml


@pytest.fixture(autouse=True)
def private_tempdir() -> None:
    """Overrides conftest's: the ServerApp runs in this process, its clients in Ray
    workers, and both must see the same temporary directory (the run's scratch folder,
    which the ServerApp removes at the end).
    """


def _toy_dataset(folder: Path) -> None:
    """Random 8x8 images of 4 classes: small enough for a resnet18 on a CPU test."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for split, n in (("train", 96), ("test", 32)):
        np.savez(
            folder / f"{split}.npz",
            x=rng.integers(0, 256, (n, 8, 8), dtype=np.uint8),
            y=np.arange(n) % 4,
        )


def _apps(root: Path, out: Path, seen: Path) -> tuple[ServerApp, ClientApp]:
    settings = {
        "data.source": "local",
        "data.root": str(root),
        "data.name": "toy",
        "data.partitioner": "iid",
        "data.mean": [0.5],
        "data.std": [0.25],
        "model.meme": "resnet18",
        "model.local": "mlp",
        "train.batch_size": 16,
        "train.momentum": 0.9,
        "federation.num_rounds": 2,
        "federation.min_nodes": 2,
        "output.dir": str(out),
        "output.run_name": "bn",
        "output.plot": False,
    }

    def capture(msg: Message, context: Context, call_next: Callable) -> Message:
        # run_simulation passes an empty run-config: hand the app this test's settings
        context = Context(
            context.run_id,
            context.node_id,
            context.node_config,
            context.state,
            {"experiment": "base", **{k: str(v) for k, v in settings.items()}},
        )
        reply = call_next(msg, context)
        if msg.metadata.message_type == MessageType.TRAIN:
            r = int(msg.content["config"]["server-round"])
            pid = int(context.node_config["partition-id"])
            torch.save(
                {
                    "received": msg.content["arrays"].to_torch_state_dict(),
                    "sent": reply.content["arrays"].to_torch_state_dict(),
                    "num-examples": int(reply.content["metrics"]["num-examples"]),
                },
                seen / f"r{r}-p{pid}.pt",
            )
        return reply

    client = ClientApp(mods=[capture])
    client.train()(train)
    client.evaluate()(evaluate)
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_fml(grid, load_config("base", settings), context.run_id)

    return server, client


def _weighted(replies: list[dict], key: str) -> torch.Tensor:
    total = sum(r["num-examples"] for r in replies)
    acc = sum(r["sent"][key].double() * (r["num-examples"] / total) for r in replies)
    return acc  # type: ignore[return-value]


@pytest.mark.simulation
@pytest.mark.slow
def test_resnet18_meme_running_statistics_are_averaged(tmp_path: Path) -> None:
    _toy_dataset(tmp_path / "data" / "toy")
    seen = tmp_path / "seen"
    seen.mkdir()
    server, client = _apps(tmp_path / "data", tmp_path / "out", seen)
    run_simulation(
        server, client, num_supernodes=2, backend_config={"client_resources": {"num_cpus": 1}}
    )
    rounds = {
        r: [torch.load(seen / f"r{r}-p{p}.pt", weights_only=False) for p in (0, 1)] for r in (1, 2)
    }
    buffers = [k for k in rounds[1][0]["sent"] if "running_" in k or "num_batches" in k]
    assert len(buffers) == 3 * 20  # resnet18: 20 BatchNorm layers, 3 buffers each
    first_mean = "bn1.running_mean"
    assert not torch.equal(rounds[1][0]["sent"][first_mean], rounds[1][1]["sent"][first_mean])

    # round 2's global model is the example-weighted mean of round 1's memes, buffers too
    received = rounds[2][0]["received"]
    assert all(torch.equal(received[k], rounds[2][1]["received"][k]) for k in received)
    ckpt = load_checkpoint(tmp_path / "out" / "bn" / "checkpoint.ckpt")
    assert ckpt["round"] == 2
    final = {k: torch.from_numpy(v.numpy()) for k, v in ckpt["arrays"].items()}
    for r, global_after in ((1, received), (2, final)):
        for key in buffers:
            expected = _weighted(rounds[r], key)
            got = global_after[key]
            assert got.dtype == rounds[r][0]["sent"][key].dtype, key
            if key.endswith("num_batches_tracked"):
                assert int(got) == int(torch.round(expected)), key
            else:
                assert torch.allclose(got.double(), expected, atol=1e-6), (r, key)
    # a meme's statistics move during training: what came back is not what was sent
    assert not torch.equal(rounds[2][0]["sent"][first_mean], received[first_mean])
