"""The last-batch policy, measured where it matters: one P2 client trained alone.

On P2's split client 7 holds 2,305 train examples: at batch 64 every epoch ends with a step
on one example (2,305 = 36 x 64 + 1). This trains that client's ``cnn`` alone (P2's SGD:
lr 0.01, momentum 0.9, weight decay 5e-4, batch 64), one epoch per round as in P2, and
scores it on its own test part after every epoch, once per policy (``keep``, ``drop``,
``merge``) and seed, with the same initialization and batch order for every policy.

    python -m tools.last_batch                       # client 7, 30 epochs, seed 42
    python -m tools.last_batch --seeds 42 43 44 --out docs/results/last_batch.json

It reports, per policy, the final accuracy, the mean of the last 5 epochs and the *swing*:
the mean absolute change of the test accuracy from one epoch to the next over the last 10.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fml_flower.config import LAST_BATCH, load_config
from fml_flower.data import federated_data
from fml_flower.models import build_model
from fml_flower.training import evaluate, run_epochs, sgd, supervised_step


def measure(client: int, epochs: int, seed: int, policy: str) -> list[float]:
    """Test accuracy of ``client``'s model after every epoch, with ``policy``."""
    cfg = load_config("p2")
    data = federated_data(cfg.data, cfg.federation.min_nodes).client(client, 10)
    t = cfg.train
    model = build_model("cnn", data.train.x.shape[1:], 10, seed=seed)  # type: ignore[arg-type]
    opt = sgd(model, t.lr, t.momentum, t.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    step = supervised_step(model, opt)
    accs = []
    for _ in range(epochs):
        run_epochs(step, (data.train.x, data.train.y), t.batch_size, 1, gen, policy)
        accs.append(evaluate(model, data.test.x, data.test.y).accuracy)
    return accs


def summary(accs: list[float]) -> dict[str, float]:
    """Final accuracy, mean of the last 5 and the swing over the last 10 epochs."""
    tail = accs[-10:]
    return {
        "final": accs[-1],
        "last5_mean": statistics.mean(accs[-5:]),
        "swing": statistics.mean(abs(b - a) for a, b in itertools.pairwise(tail)),
        "min_last10": min(tail),
        "max_last10": max(tail),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print (and optionally write) the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--client", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--out", type=Path, help="write the raw accuracies and summary (JSON)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = []
    for seed in args.seeds:
        for policy in LAST_BATCH:
            t0 = time.perf_counter()
            accs = measure(args.client, args.epochs, seed, policy)
            row = {"seed": seed, "policy": policy, **summary(accs), "accuracy": accs}
            row["seconds"] = time.perf_counter() - t0
            runs.append(row)
            print(
                f"seed {seed} {policy:5s}: final {row['final']:.4f}, last-5 mean "
                f"{row['last5_mean']:.4f}, swing {row['swing']:.4f} "
                f"[{row['min_last10']:.4f}, {row['max_last10']:.4f}] ({row['seconds']:.0f} s)",
                flush=True,
            )
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                record = {
                    "command": "python -m tools.last_batch "
                    + " ".join(sys.argv[1:] if argv is None else argv),
                    "client": args.client,
                    "epochs": args.epochs,
                    "runs": runs,
                }
                args.out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
