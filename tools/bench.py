"""Performance benchmark: FML against the plain-PyTorch floor, and Flower's share of a round.

    python -m tools.bench epoch             # (1)+(2) floor vs our epoch, P1 and CIFAR-10
    python -m tools.bench sim               # (3) P1 through Flower's simulation engine
    python -m tools.bench sim100            # (4) 100 clients, 10% sampled per round
    python -m tools.bench floor             # (6) the P1 round against its PyTorch floor
    python -m tools.bench crossdevice       # (7) CIFAR-10, 100/300/1,000 clients, 50 a round
    python -m tools.bench deploy --before <dir>   # (5) loopback deployment, before/after
    python -m tools.bench deploy --evaluation     # (5) separate vs in-train evaluation
    python -m tools.bench deploy --baseline <dir> # (5) an older checkout, same settings
    python -m tools.bench precision         # (8) fp32 / bf16 x memory format: epochs, rounds
    python -m tools.bench all

Each part prints its table, stores its numbers in ``docs/performance/<part>.json`` and
rewrites the generated section of ``docs/performance.md`` (between the ``bench`` markers)
from all stored parts, with the date, machine and command of each. Data comes from
``--data-root`` (default ``$FML_DATA_ROOT`` or ``../shared/data``).

Timings on a shared machine are noisy: the epoch part alternates floor and ours and quotes
medians and the ratio of medians; the run parts quote medians over rounds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fml_flower.config import CONF_DIR, FMLConfig, load_config
from fml_flower.models import build_model, resolve_device
from fml_flower.training import (
    Compute,
    cpu_has_native_bf16,
    evaluate,
    mutual_learning_epoch,
    sgd,
    supervised_epoch,
)

ROOT = CONF_DIR.parent
DOC = ROOT / "docs" / "performance.md"
STORE = ROOT / "docs" / "performance"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


# ----------------------------------------------------------------------------- machine


def machine() -> str:
    """A one-line description of where the numbers were taken."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or platform.machine()
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------- (1) and (2): epoch


def floor_epoch(
    local: nn.Module,
    meme: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    alpha: float,
    beta: float,
    lr: float,
    generator: torch.Generator,
) -> None:
    """The floor: a bare PyTorch loop training both models with the FML losses."""
    opt_l = torch.optim.SGD(local.parameters(), lr=lr)
    opt_m = torch.optim.SGD(meme.parameters(), lr=lr)
    local.train()
    meme.train()
    order = torch.randperm(len(y), generator=generator).to(y.device)
    for i in range(0, len(y), batch_size):
        idx = order[i : i + batch_size]
        xb, yb = x[idx], y[idx]
        zl, zm = local(xb), meme(xb)
        kl_l = F.kl_div(F.log_softmax(zl, 1), F.softmax(zm.detach(), 1), reduction="batchmean")
        kl_m = F.kl_div(F.log_softmax(zm, 1), F.softmax(zl.detach(), 1), reduction="batchmean")
        loss_l = alpha * F.cross_entropy(zl, yb) + (1 - alpha) * kl_l
        loss_m = beta * F.cross_entropy(zm, yb) + (1 - beta) * kl_m
        opt_l.zero_grad()
        opt_m.zero_grad()
        (loss_l + loss_m).backward()
        opt_l.step()
        opt_m.step()


def our_epoch(
    local: nn.Module,
    meme: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    alpha: float,
    beta: float,
    lr: float,
    generator: torch.Generator,
) -> None:
    """Our client's code path: :func:`mutual_learning_epoch`, with its metrics read."""
    stats = mutual_learning_epoch(
        local,
        meme,
        sgd(local, lr, 0.0, 0.0),
        sgd(meme, lr, 0.0, 0.0),
        (x, y),
        batch_size,
        alpha,
        beta,
        generator=generator,
    )
    stats.means()


@dataclass
class EpochCase:
    """One (data, models, batch size) setting of the epoch comparison."""

    name: str
    experiment: str
    overrides: dict[str, Any]
    max_samples_cpu: int


EPOCH_CASES = [
    EpochCase("P1 MNIST cnn+cnn, batch 32", "p1", {}, 0),
    EpochCase("P2 CIFAR-10 cnn+cnn, batch 64", "p2", {}, 2048),
    EpochCase(
        "P2 CIFAR-10 resnet18+resnet18, batch 64",
        "p2",
        {"model.meme": "resnet18", "model.local": "resnet18"},
        128,
    ),
]


def _client0(cfg: FMLConfig, num_clients: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    from fml_flower.data import federated_data

    data = federated_data(cfg.data, num_clients)
    part = data.client(0, num_clients)
    return part.train.x, part.train.y, data.info


TENSOR_CACHE_CAP = 2048
"""Samples kept per case in a ``--tensor-cache`` (small enough to carry to a GPU machine)."""


def _case_tensors(
    case: EpochCase, cfg: FMLConfig, tensor_cache: Path | None
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Client 0's training tensors of ``case``, from ``tensor_cache`` when it has them."""
    from fml_flower.tensors import ClientData, TensorSplit, load_partition, save_partition

    if tensor_cache is None:
        return _client0(cfg, cfg.federation.min_nodes)
    path = tensor_cache / f"{case.experiment}-client0.pt"
    fingerprint = f"{case.experiment} client 0, first {TENSOR_CACHE_CAP} samples"
    loaded = load_partition(path, fingerprint)
    if loaded is None:
        x, y, info = _client0(cfg, cfg.federation.min_nodes)
        split = TensorSplit(x[:TENSOR_CACHE_CAP].clone(), y[:TENSOR_CACHE_CAP].clone())
        empty = TensorSplit(x[:0].clone(), y[:0].clone())
        save_partition(path, ClientData(split, empty), info, fingerprint)
        loaded = load_partition(path, fingerprint)
    assert loaded is not None
    data, info = loaded
    return data.train.x, data.train.y, info


def bench_epoch(
    data_root: str,
    device_name: str,
    repeats: int,
    max_samples: int | None,
    tensor_cache: Path | None = None,
    epochs: int = 1,
    cases: list[str] | None = None,
) -> dict[str, Any]:
    """Floor vs our epoch, alternating, ``repeats`` times per case; each timing covers
    ``epochs`` epochs (more for a fast GPU, whose single epoch is too short to time).
    """
    device = resolve_device(device_name)
    rows = []
    for case in EPOCH_CASES:
        if cases and not any(c.lower() in case.name.lower() for c in cases):
            continue
        cfg = load_config(case.experiment, {**case.overrides, "data.root": data_root})
        x, y, info = _case_tensors(case, cfg, tensor_cache)
        cap = max_samples if max_samples is not None else case.max_samples_cpu
        if device.type == "cpu" and cap:
            x, y = x[:cap], y[:cap]
        x, y = x.to(device), y.to(device)
        t = cfg.train
        local0 = build_model(cfg.model.local, info.input_shape, info.num_classes, seed=1)
        meme0 = build_model(cfg.model.meme, info.input_shape, info.num_classes, seed=2)
        runs: dict[str, list[float]] = {"floor": [], "ours": []}
        loops: dict[str, Callable[..., None]] = {"floor": floor_epoch, "ours": our_epoch}
        for rep in range(repeats + 1):  # the first pair warms up and is not counted
            for name in ("floor", "ours") if rep % 2 == 0 else ("ours", "floor"):
                local, meme = copy.deepcopy(local0).to(device), copy.deepcopy(meme0).to(device)
                gen = torch.Generator().manual_seed(rep)
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(epochs):
                    loops[name](local, meme, x, y, t.batch_size, t.alpha, t.beta, t.lr, gen)
                _sync(device)
                if rep > 0:
                    runs[name].append(epochs * len(y) / (time.perf_counter() - t0))
        floor, ours = statistics.median(runs["floor"]), statistics.median(runs["ours"])
        pair_ratios = [o / f for o, f in zip(runs["ours"], runs["floor"], strict=True)]
        row = {
            "case": case.name,
            "samples": len(y),
            "floor_sps": floor,
            "ours_sps": ours,
            "ratio": ours / floor,
            "pair_ratio_median": statistics.median(pair_ratios),
            "floor_runs_sps": runs["floor"],
            "ours_runs_sps": runs["ours"],
            "repeats": repeats,
            "epochs_per_timing": epochs,
        }
        print(
            f"  {case.name}: floor {floor:.0f}/s, ours {ours:.0f}/s, ratio {ours / floor:.3f}",
            flush=True,
        )
        rows.append(row)
    return {"device": str(device), "threads": torch.get_num_threads(), "rows": rows}


# ------------------------------------------------------- (8): precision and memory format

PRECISION_MODES = {
    "fp32": Compute("fp32", False),
    "fp32+cl": Compute("fp32", True),
    "bf16": Compute("bf16", False),
    "bf16+cl": Compute("bf16", True),
}
"""The compared settings: precision, and ``+cl`` for channels-last convolutions."""

PRECISION_CASES = [
    EpochCase("P1 MNIST cnn, batch 32", "p1", {}, 1024),
    EpochCase("P2 CIFAR-10 cnn-unpadded, batch 64", "p2", {}, 1024),
]


def bench_precision(
    data_root: str, repeats: int, modes: list[str], max_samples: int | None
) -> dict[str, Any]:
    """Training throughput (images/s, one thread by default) of FML's step (two models)
    and a single-model step (FedAvg, local) in each of ``modes``, for P1's ``cnn`` and
    P2's ``cnn-unpadded`` on client 0's real data; the modes alternate, ``repeats`` timed
    passes each after one warm-up, medians quoted. Evaluation throughput is timed too.
    """
    rows = []
    for case in PRECISION_CASES:
        cfg = load_config(case.experiment, {**case.overrides, "data.root": data_root})
        x, y, info = _client0(cfg, cfg.federation.min_nodes)
        cap = max_samples if max_samples is not None else case.max_samples_cpu
        if cap:
            x, y = x[:cap], y[:cap]
        t = cfg.train
        arch = cfg.model.meme
        for kind in ("fml", "single"):
            runs: dict[str, list[float]] = {m: [] for m in modes}
            evals: dict[str, list[float]] = {m: [] for m in modes}
            for rep in range(repeats + 1):
                order = modes if rep % 2 == 0 else list(reversed(modes))
                for mode in order:
                    compute = PRECISION_MODES[mode]
                    local = compute.model(build_model(arch, info.input_shape, 10, seed=1))
                    meme = compute.model(build_model(arch, info.input_shape, 10, seed=2))
                    gen = torch.Generator().manual_seed(rep)
                    opt_l = sgd(local, t.lr, t.momentum, t.weight_decay)
                    t0 = time.perf_counter()
                    if kind == "fml":
                        opt_m = sgd(meme, t.lr, t.momentum, t.weight_decay)
                        mutual_learning_epoch(
                            local,
                            meme,
                            opt_l,
                            opt_m,
                            (x, y),
                            t.batch_size,
                            0.5,
                            0.5,
                            generator=gen,
                            compute=compute,
                        ).means()
                    else:
                        supervised_epoch(
                            local, opt_l, (x, y), t.batch_size, gen, compute=compute
                        ).means()
                    train_s = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    evaluate(local, x, y, compute=compute)
                    eval_s = time.perf_counter() - t0
                    if rep > 0:
                        runs[mode].append(len(y) / train_s)
                        evals[mode].append(len(y) / eval_s)
            base = statistics.median(runs[modes[0]])
            for mode in modes:
                row = {
                    "case": case.name,
                    "step": "FML (two models)" if kind == "fml" else "one model",
                    "mode": mode,
                    "samples": len(y),
                    "train_ips": statistics.median(runs[mode]),
                    "train_runs_ips": runs[mode],
                    "eval_ips": statistics.median(evals[mode]),
                    "speedup_vs_first": statistics.median(runs[mode]) / base,
                    "repeats": repeats,
                }
                print(
                    f"  {case.name}, {row['step']}, {mode}: train {row['train_ips']:.0f}/s "
                    f"(x{row['speedup_vs_first']:.2f}), eval {row['eval_ips']:.0f}/s",
                    flush=True,
                )
                rows.append(row)
    return {
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
        "rows": rows,
    }


def bench_precision_rounds(data_root: str, rounds: int, modes: list[str]) -> dict[str, Any]:
    """Whole rounds of P1 (20 clients) and P2 (10 clients) through the simulation engine
    (two workers, one per core), FML, once per mode in ``modes``.
    """
    rows = []
    for experiment, clients in (("p1", 20), ("p2", 10)):
        for mode in modes:
            compute = PRECISION_MODES[mode]
            overrides = {
                "train.precision": compute.precision,
                "train.memory_format": "channels_last" if compute.channels_last else "contiguous",
            }
            result = bench_simulation(
                data_root, rounds, clients, 1.0, [1], [0.1], experiment, overrides
            )
            for row in result["rows"]:
                rows.append({**row, "mode": mode})
    return {"rows": rows}


# ------------------------------------------------------------------ (6): the round floor


_FLOOR: dict[str, Any] = {}
"""The floor's data and models, set before worker processes fork (they inherit it)."""


def _floor_clients(
    ids: list[int], global_state: dict[str, torch.Tensor], threads: int
) -> tuple[dict[str, torch.Tensor], int]:
    """One round of FML for clients ``ids`` in plain PyTorch: each client forks the global
    model into a meme, trains it with its personalized model for one epoch, and scores both
    on its test part. Returns the example-weighted sum of the memes and the example count
    (the aggregation's share of this process).
    """
    torch.set_num_threads(threads)
    f = _FLOOR
    t = f["train"]
    total: dict[str, torch.Tensor] = {k: torch.zeros_like(v) for k, v in global_state.items()}
    examples = 0
    meme = f["meme"]
    for pid in ids:
        part, local = f["parts"][pid], f["locals"][pid]
        meme.load_state_dict(global_state)
        gen = torch.Generator().manual_seed(pid)
        floor_epoch(
            local, meme, part.train.x, part.train.y, t.batch_size, t.alpha, t.beta, t.lr, gen
        )
        with torch.no_grad():
            for model in (meme, local):
                model.eval()
                for i in range(0, len(part.test.y), 512):
                    model(part.test.x[i : i + 512]).argmax(1)
                model.train()
        n = len(part.train.y)
        for k, v in meme.state_dict().items():
            total[k] += v * n
        examples += n
    return total, examples


def _floor_worker(args: tuple) -> tuple[dict[str, torch.Tensor], int]:
    return _floor_clients(*args)


def bench_floor_round(
    data_root: str, arch: str, rounds: int, layouts: list[str]
) -> list[dict[str, Any]]:
    """The least wall time plain PyTorch needs for one P1 round's work on this machine
    (every client's FML epoch, both models scored on every client's test part, the
    average of the memes and the central evaluation), for each process layout:
    ``one-process`` (all cores' threads) and ``per-core`` (one forked process per core,
    one thread each, sharing the clients). Data and personalized models are in memory,
    built before the timing; the first round warms up and is not counted.
    """
    import multiprocessing

    from fml_flower.data import federated_data

    cfg = load_config("p1", {"data.root": data_root, "model.meme": arch, "model.local": arch})
    n = cfg.federation.min_nodes
    data = federated_data(cfg.data, n)
    info = data.info
    central = data.central_test()
    cores = os.cpu_count() or 1
    rows = []
    for layout in layouts:
        procs = cores if layout == "per-core" else 1
        threads = 1 if layout == "per-core" else cores
        _FLOOR.update(
            parts=[data.client(i, n) for i in range(n)],
            locals=[
                build_model(arch, info.input_shape, info.num_classes, seed=i) for i in range(n)
            ],
            meme=build_model(arch, info.input_shape, info.num_classes),
            train=cfg.train,
        )
        global_model = build_model(arch, info.input_shape, info.num_classes, seed=100)
        pool = multiprocessing.get_context("fork").Pool(procs) if procs > 1 else None
        times = []
        try:
            for r in range(rounds + 1):
                t0 = time.perf_counter()
                state = {k: v.clone() for k, v in global_model.state_dict().items()}
                jobs = [(list(range(k, n, procs)), state, threads) for k in range(procs)]
                # forked workers train their own copies of the personalized models; the
                # floor counts the work, so which copy a client continues does not matter
                results = (
                    [_floor_worker(jobs[0])] if pool is None else pool.map(_floor_worker, jobs)
                )
                torch.set_num_threads(cores)
                total = sum(e for _, e in results)
                avg = {k: sum(res[k] for res, _ in results) / total for k in results[0][0]}
                global_model.load_state_dict(avg)
                with torch.no_grad():
                    global_model.eval()
                    for i in range(0, len(central.y), 512):
                        global_model(central.x[i : i + 512]).argmax(1)
                    global_model.train()
                if r > 0:
                    times.append(time.perf_counter() - t0)
        finally:
            if pool is not None:
                pool.close()
                pool.join()
            _FLOOR.clear()
        row = {
            "arch": arch,
            "layout": layout,
            "processes": procs,
            "threads": threads,
            "round_median_s": statistics.median(times),
            "rounds_s": times,
        }
        print(f"  floor {arch} {layout}: {json.dumps(row)}", flush=True)
        rows.append(row)
    return rows


def bench_round_floor(
    data_root: str,
    archs: list[str],
    rounds: int,
    sim_rounds: int,
    baseline: Path | None = None,
) -> dict[str, Any]:
    """(6): for each CNN layout, the P1 round floor (the faster process layout) and our
    P1 round in the simulation engine (2 workers of 1 CPU), and their ratio; with
    ``baseline`` (an older checkout) its simulated round of P1's own ``cnn`` too, in the
    same run.
    """
    rows = []
    for arch in archs:
        # an older checkout may not know a layout added since (cnn-unpadded): it runs the
        # protocol's own model only
        dirs = {"current": ROOT, **({"baseline": baseline} if baseline and arch == "cnn" else {})}
        floors = bench_floor_round(data_root, arch, rounds, ["one-process", "per-core"])
        best = min(floors, key=lambda f: f["round_median_s"])
        sims = bench_simulation(
            data_root,
            sim_rounds,
            20,
            1.0,
            [1],
            overrides={"model.meme": arch, "model.local": arch},
            app_dirs=dirs,
        )["rows"]
        for sim in sims:
            rows.append(
                {
                    "arch": arch,
                    "variant": sim["variant"],
                    "floors": floors,
                    "floor_layout": best["layout"],
                    "floor_round_s": best["round_median_s"],
                    "sim_round_s": sim["round_wall_median_s"],
                    "ratio": sim["round_wall_median_s"] / best["round_median_s"],
                    "sim": sim,
                }
            )
            print(f"  {arch} {sim['variant']}: sim / floor = {rows[-1]['ratio']:.3f}", flush=True)
    return {"rows": rows}


# ------------------------------------------------------------- (3) and (4): simulation


def _round_costs(run_dir: Path, workers: int) -> dict[str, Any]:
    """Round wall times against the work recorded in ``metrics.json``.

    Per round: *client compute* is the sum over clients of setup + training + evaluation
    seconds (measured inside the ClientApp); *idle share* is the part of the workers' time
    not spent on it, ``1 - compute / (workers x wall)``, which includes the server's
    central evaluation and workers waiting for the slowest one; *Flower's share* is what
    is left of the round after the busiest worker's client compute and the central
    evaluation (ours), ``1 - (busiest + central) / wall``: message passing, state
    transfer, scheduling and polling. Replies do not say which worker ran a client, so
    the busiest worker's compute is taken as ``compute / workers`` (even sharing: a lower
    bound, so Flower's share is an upper bound).
    """
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rounds = [r for r in metrics["rounds"] if r["round"] > 0]
    walls, computes, idle, flower, central = [], [], [], [], []
    for r in rounds:
        compute = sum(
            c.get("setup_seconds", 0) + c.get("train_seconds", 0)
            for c in r.get("clients_train", {}).values()
        ) + sum(c.get("eval_seconds", 0) for c in r.get("clients", {}).values())
        central_s = r.get("central_seconds", 0.0)
        walls.append(r["seconds"])
        computes.append(compute)
        central.append(central_s)
        idle.append(max(0.0, 1 - compute / (workers * r["seconds"])))
        flower.append(max(0.0, 1 - (compute / workers + central_s) / r["seconds"]))
    setup = [c.get("setup_seconds", 0) for r in rounds for c in r["clients_train"].values()]
    return {
        "rounds": len(rounds),
        "round_wall_median_s": statistics.median(walls),
        "client_compute_median_s": statistics.median(computes),
        "central_eval_median_s": statistics.median(central),
        "idle_share_median": statistics.median(idle),
        "flower_share_median": statistics.median(flower),
        "client_setup_median_s": statistics.median(setup) if setup else None,
        "final_personal_acc": rounds[-1].get("personal_acc"),
        "final_global_acc": rounds[-1].get("global_acc"),
        "clients_with_model": len(
            {c for r in rounds for c, m in r.get("clients_train", {}).items() if m}
        ),
    }


def bench_simulation(
    data_root: str,
    rounds: int,
    clients: int,
    fraction: float,
    client_cpus: list[int],
    poll_intervals: list[float] | None = None,
    experiment: str = "p1",
    overrides: dict[str, Any] | None = None,
    app_dirs: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """P1 (or another experiment, or a larger federation) through ``flwr run`` on a
    simulation SuperLink, once per (CPUs per client, server poll interval) pair and app
    folder (``app_dirs``: label -> checkout, e.g. an older commit beside this one; default
    this checkout as ``current``).
    """
    from tools.experiments import PeakMemory
    from tools.launch import run_app, run_status, simulation_superlink

    rows = []
    variants = app_dirs or {"current": ROOT}
    settings = [
        (c, p, label) for p in (poll_intervals or [0.1]) for c in client_cpus for label in variants
    ]
    for cpus, poll, label in settings:
        # One SuperLink per run, started in the app's folder: Ray puts the driver's working
        # directory first on its workers' path, so the ClientApps import the packages there
        # (a SuperLink in this checkout would run this checkout's clients for an older app).
        with (
            tempfile.TemporaryDirectory(prefix="fml-bench-") as tmp,
            simulation_superlink(Path(tmp) / ".flwr", cwd=variants[label]) as (connection, pid),
        ):
            flwr_home = Path(tmp) / ".flwr"
            name = f"{experiment}-c{clients}-f{fraction:.4f}-cpu{cpus}-poll{poll}-{label}"
            run_config = {
                "experiment": experiment,
                **(overrides or {}),
                "data.root": data_root,
                "federation.num_rounds": rounds,
                "federation.min_nodes": max(1, round(clients * fraction)),
                "federation.fraction_train": fraction,
                "federation.fraction_evaluate": fraction,
                "federation.poll_interval": poll,
                "output.dir": tmp,
                "output.run_name": name,
                "output.plot": False,
            }
            t0 = time.monotonic()
            with PeakMemory(pid, interval=0.5) as memory:
                proc = run_app(
                    variants[label],
                    flwr_home,
                    connection,
                    run_config,
                    clients,
                    3600,
                    num_cpus=cpus,
                )
            wall = time.monotonic() - t0
            run_dir = Path(tmp) / name
            if not (run_dir / "metrics.json").is_file():
                raise RuntimeError(
                    f"benchmark run {name} failed: {run_status(flwr_home, connection)}\n"
                    f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
                )
            workers = max(1, (os.cpu_count() or 1) // cpus)
            costs = _round_costs(run_dir, workers)
            round_sum = sum(
                r["seconds"] for r in json.loads((run_dir / "metrics.json").read_text())["rounds"]
            )
            row = {
                "clients": clients,
                "fraction": fraction,
                "client_cpus": cpus,
                "poll_interval_s": poll,
                "workers": workers,
                **costs,
                "wall_s": wall,
                "startup_and_shutdown_s": wall - round_sum,
                "peak_memory_mb": memory.peak_mb,
                "peak_memory_by_process_mb": memory.breakdown,
                "experiment": experiment,
                "overrides": overrides or {},
                "variant": label,
                "app_commit": _commit_of(variants[label]),
            }
            print(f"  {name}: {json.dumps(row)}", flush=True)
            rows.append(row)
    return {"rows": rows}


def _commit_of(folder: Path) -> str:
    """The short commit of a checkout (with ``+`` when the app's tracked files, those a run
    ships, are modified; the bench's own writes to ``docs/`` do not count).
    """
    import subprocess

    head = subprocess.run(
        ["git", "-C", str(folder), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        [
            "git",
            "-C",
            str(folder),
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            "fml_flower",
            "strategies",
            "client_app",
            "server_app",
            "conf",
            "pyproject.toml",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return head + ("+" if dirty else "") if head else "?"


def bench_cross_device(
    data_root: str, rounds: int, client_counts: list[int], per_round: int = 50
) -> dict[str, Any]:
    """(7): the cross-device configuration (``conf/cross_device.yaml``: CIFAR-10 Dirichlet,
    batch 10, one local epoch) at several federation sizes with the same number of clients
    per round: peak memory and median round time against the number of clients.
    """
    rows = []
    for clients in client_counts:
        result = bench_simulation(
            data_root, rounds, clients, per_round / clients, [1], experiment="cross_device"
        )
        rows += result["rows"]
    return {"rows": rows, "per_round": per_round}


# ---------------------------------------------------------------- (5): deployment


def bench_deployment(
    app_dirs: dict[str, Path],
    rounds: int,
    trials: int,
    extra: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """SuperLink + 2 SuperNodes on loopback, trivial work (mlp, 2 x ~160 digits), for
    each app folder in ``app_dirs`` (e.g. the code before and after a change), alternating;
    ``extra[label]`` adds run-config keys to that variant (e.g. ``federation.evaluation``).
    """
    from tools.launch import deployment, run_app, run_status

    rows = []
    for trial in range(trials):
        for label, app_dir in app_dirs.items():
            with tempfile.TemporaryDirectory(prefix="fml-bench-dep-") as tmp:
                tuned = label != "before"
                nodes = [  # 2 of 20 partitions: about 160 training digits per node
                    {"partition-id": i, "num-partitions": 20}
                    | ({"state-dir": str(Path(tmp) / f"state-{i}")} if tuned else {})
                    for i in range(2)
                ]
                run_config: dict[str, Any] = {
                    "experiment": "base",
                    "model.meme": "mlp",
                    "model.local": "mlp",
                    "federation.num_rounds": rounds,
                    "federation.min_nodes": 2,
                    "output.dir": tmp,
                    "output.run_name": "run",
                    "output.plot": False,
                    # 2 nodes of a 20-client split: most classes reach neither (a timing
                    # benchmark, not an accuracy one)
                    "data.allow_missing_classes": True,
                }
                if tuned:
                    run_config["federation.poll_interval"] = 0.1
                run_config.update((extra or {}).get(label, {}))
                flwr_home = Path(tmp) / ".flwr"
                with deployment(
                    flwr_home,
                    app_dir,
                    2,
                    nodes,
                    superexec_poll_interval=0.1 if tuned else None,
                ) as dep:
                    dep.wait_for_nodes(2)
                    t0 = time.monotonic()
                    proc = run_app(app_dir, flwr_home, dep.connection, run_config, None, 1800)
                    wall = time.monotonic() - t0
                    status = run_status(flwr_home, dep.connection)
                run_dir = Path(tmp) / "run"
                if not (run_dir / "metrics.json").is_file():
                    raise RuntimeError(
                        f"deployment benchmark ({label}) failed: {status}\n{proc.stdout[-3000:]}"
                    )
                metrics = json.loads((run_dir / "metrics.json").read_text())
                rs = [r for r in metrics["rounds"] if r["round"] > 0]
                compute = [
                    max(
                        (c.get("setup_seconds", 0) + c.get("train_seconds", 0))
                        for c in r["clients_train"].values()
                    )
                    + max(c.get("eval_seconds", 0) for c in r["clients"].values())
                    for r in rs
                ]
                row = {
                    "variant": label,
                    "trial": trial,
                    "app_dir": str(app_dir),
                    "rounds": len(rs),
                    "round_wall_median_s": statistics.median(r["seconds"] for r in rs),
                    "round_walls_s": [r["seconds"] for r in rs],
                    "client_compute_median_s": statistics.median(compute),
                    "wall_s": wall,
                }
                row["overhead_median_s"] = (
                    row["round_wall_median_s"] - row["client_compute_median_s"]
                )
                print(f"  {label}: {json.dumps(row)}", flush=True)
                rows.append(row)
    return {"rows": rows}


# ------------------------------------------------------------------------- the report


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def render(parts: dict[str, dict[str, Any]]) -> str:
    """Markdown tables of every stored part."""
    out = []
    for key in sorted(k for k in parts if k.startswith("epoch")):
        p = parts[key]
        out += [
            f"### (1)+(2) Floor vs our mutual-learning epoch (`{key}`)",
            "",
            f"{p['date']}, {p['machine']}, device {p['result']['device']}, "
            f"{p['result']['threads']} torch threads. Command: `{p['command']}`",
            "",
            "| case | samples | timed pairs | floor (samples/s, median) | ours (samples/s, median) "
            "| ratio of medians | median of paired ratios |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in p["result"]["rows"]:
            paired = r.get("pair_ratio_median")
            out.append(
                f"| {r['case']} | {r['samples']} | {r.get('repeats', '-')} "
                f"| {r['floor_sps']:.0f} | {r['ours_sps']:.0f} | {r['ratio']:.3f} "
                f"| {'-' if paired is None else f'{paired:.3f}'} |"
            )
        out.append("")
    for key in sorted(k for k in parts if k.startswith("sim")):
        title = "(4) 100 clients" if key.startswith("sim100") else "(3) P1 in the simulation engine"
        p = parts[key]
        out += [
            f"### {title} (`{key}`)",
            "",
            f"{p['date']}, {p['machine']}. Command: `{p['command']}`",
            "",
            "| clients | sampled | CPUs per client (workers) | server poll (s) | rounds "
            "| round wall median (s) | client compute median (s) | central eval median (s) "
            "| idle share median | Flower's share median | client setup median (s) "
            "| start-up + shutdown (s) | peak memory (MiB) | clients holding a model |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in p["result"]["rows"]:
            out.append(
                f"| {r['clients']} | {r['fraction']:.0%} | {r['client_cpus']} ({r['workers']}) "
                f"| {r.get('poll_interval_s', 3.0)} | {r['rounds']} "
                f"| {_fmt(r['round_wall_median_s'])} "
                f"| {_fmt(r['client_compute_median_s'])} "
                f"| {_fmt(r.get('central_eval_median_s'))} "
                f"| {_fmt(r.get('idle_share_median'), 3)} | {r['flower_share_median']:.1%} "
                f"| {_fmt(r['client_setup_median_s'], 3)} | {_fmt(r['startup_and_shutdown_s'], 1)}"
                f" | {r['peak_memory_mb']:.0f} | {r['clients_with_model']} |"
            )
        out.append("")
    for key in sorted(k for k in parts if k.startswith("floor")):
        p = parts[key]
        out += [
            f"### (6) The P1 round against its plain-PyTorch floor (`{key}`)",
            "",
            f"{p['date']}, {p['machine']}. Command: `{p['command']}`",
            "",
            "| model layout | code | floor, one process (s) | floor, one process per core (s) "
            "| simulated P1 round, median (s) | simulated / floor "
            "| simulation peak memory (MiB) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in p["result"]["rows"]:
            by = {f["layout"]: f["round_median_s"] for f in r["floors"]}
            code = f"{r.get('variant', 'current')} ({r['sim'].get('app_commit', '?')})"
            out.append(
                f"| `{r['arch']}` | {code} | {_fmt(by.get('one-process'))} "
                f"| {_fmt(by.get('per-core'))} | {_fmt(r['sim_round_s'])} | **{r['ratio']:.3f}** "
                f"| {r['sim']['peak_memory_mb']:.0f} |"
            )
        out.append("")
    for key in sorted(k for k in parts if k.startswith("crossdevice")):
        p = parts[key]
        out += [
            f"### (7) Cross-device: many clients, {p['result']['per_round']} per round (`{key}`)",
            "",
            f"{p['date']}, {p['machine']}. Command: `{p['command']}`",
            "",
            "| clients | per round | rounds | round wall median (s) | peak memory (MiB) "
            "| clients that trained | personalized, last round | global (clients), last round |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in p["result"]["rows"]:
            out.append(
                f"| {r['clients']} | {round(r['clients'] * r['fraction'])} | {r['rounds']} "
                f"| {_fmt(r['round_wall_median_s'])} | {r['peak_memory_mb']:.0f} "
                f"| {r['clients_with_model']} | {_fmt(r.get('final_personal_acc'), 4)} "
                f"| {_fmt(r.get('final_global_acc'), 4)} |"
            )
        out.append("")
    breakdowns = [
        (key, r)
        for key in sorted(parts)
        for r in _sim_rows(parts[key])
        if r.get("peak_memory_by_process_mb")
    ]
    if breakdowns:
        out += [
            "### Where the memory of a simulation goes: resident MiB per process at the peak",
            "",
            "Summed over processes of one name (two `ray::ClientAppActor` workers, ...). "
            "Resident memory counts shared library pages in every process that maps them "
            "(the CUDA build of torch alone is about 0.5 GB per process).",
            "",
            "| part | run | total | by process |",
            "|---|---|---|---|",
        ]
        for key, r in breakdowns:
            by = ", ".join(f"{k} {v:.0f}" for k, v in r["peak_memory_by_process_mb"].items())
            label = f"{r.get('experiment', 'p1')} {r['clients']} clients"
            if r.get("variant"):
                label += f", {r['variant']} ({r.get('app_commit', '?')})"
            if r.get("overrides"):
                label += " " + " ".join(f"{k}={v}" for k, v in r["overrides"].items())
            out.append(f"| `{key}` | {label} | {r['peak_memory_mb']:.0f} | {by} |")
        out.append("")
    for name in sorted(k for k in parts if k == "deploy" or k.startswith("deploy-")):
        p = parts[name]
        out += [
            f"### (5) Deployment on loopback (SuperLink + 2 SuperNodes, trivial work; `{name}`)",
            "",
            f"{p['date']}, {p['machine']}. Command: `{p['command']}`",
            "",
            "| variant | trial | rounds | round wall median (s) | client compute median (s) "
            "| overhead per round (s) |",
            "|---|---|---|---|---|---|",
        ]
        for r in p["result"]["rows"]:
            out.append(
                f"| {r['variant']} | {r['trial']} | {r['rounds']} "
                f"| {_fmt(r['round_wall_median_s'])} | {_fmt(r['client_compute_median_s'])} "
                f"| {_fmt(r['overhead_median_s'])} |"
            )
        out.append("")
    for name in sorted(k for k in parts if k == "precision" or k.startswith("precision-")):
        p, res = parts[name], parts[name]["result"]
        if name.startswith("precision-rounds"):
            out += [
                f"### (8) Whole FML rounds by precision and memory format (`{name}`)",
                "",
                f"{p['date']}, {p['machine']}. Simulation, two workers (one per core). "
                f"Command: `{p['command']}`",
                "",
                "| protocol | mode | rounds | round wall median (s) | client compute median (s) "
                "| vs the first mode |",
                "|---|---|---|---|---|---|",
            ]
            firsts: dict[str, float] = {}
            for r in res["rows"]:
                first = firsts.setdefault(r["experiment"], r["round_wall_median_s"])
                out.append(
                    f"| {r['experiment'].upper()} | {r['mode']} | {r['rounds']} "
                    f"| {_fmt(r['round_wall_median_s'])} | {_fmt(r['client_compute_median_s'])} "
                    f"| {r['round_wall_median_s'] / first:.2f}x |"
                )
            out.append("")
            continue
        out += [
            f"### (8) Training throughput by precision and memory format (`{name}`)",
            "",
            f"{p['date']}, {p['machine']}, {res['threads']} torch thread(s), CPU capability "
            f"{res['cpu_capability']}, native bf16: {res['native_bf16']}. Images per second "
            "(median of the timed passes; +cl = channels-last). Command: "
            f"`{p['command']}`",
            "",
            "| case | step | mode | train (img/s) | vs fp32 | eval (img/s) |",
            "|---|---|---|---|---|---|",
        ]
        for r in res["rows"]:
            out.append(
                f"| {r['case']} | {r['step']} | {r['mode']} | {r['train_ips']:.0f} "
                f"| {r['speedup_vs_first']:.2f}x | {r['eval_ips']:.0f} |"
            )
        out.append("")
    return "\n".join(out)


def _sim_rows(part: dict[str, Any]) -> list[dict[str, Any]]:
    """The simulation rows a stored part holds (sim, sim100, crossdevice, floor)."""
    rows = part.get("result", {}).get("rows", [])  # startup.json has no result
    return [r.get("sim", r) for r in rows if "peak_memory_mb" in r.get("sim", r)]


def store(part: str, result: dict[str, Any], command: str) -> None:
    """Keep one part's numbers and rewrite the generated section of the document."""
    STORE.mkdir(parents=True, exist_ok=True)
    entry = {
        "date": datetime.now().isoformat(timespec="minutes"),
        "machine": machine(),
        "command": command,
        "result": result,
    }
    (STORE / f"{part}.json").write_text(json.dumps(entry, indent=1) + "\n")
    store_section()


def store_section() -> None:
    """Rewrite the generated section of the document from every stored part."""
    parts = {p.stem: json.loads(p.read_text()) for p in sorted(STORE.glob("*.json"))}
    section = f"{BEGIN}\n{render(parts)}\n{END}"
    text = DOC.read_text() if DOC.is_file() else f"# Performance\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise RuntimeError(f"{DOC} lacks the {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    DOC.write_text(head + section + rest.split(END, 1)[1])


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "part",
        choices=[
            "epoch",
            "sim",
            "sim100",
            "floor",
            "crossdevice",
            "deploy",
            "precision",
            "precision-rounds",
            "all",
            "report",
        ],
        help="report: only rewrite docs/performance.md from the stored parts",
    )
    parser.add_argument(
        "--data-root", default=os.environ.get("FML_DATA_ROOT", str(ROOT.parent / "shared/data"))
    )
    parser.add_argument("--device", default="auto", help="epoch part: cpu, cuda or auto")
    parser.add_argument("--repeats", type=int, default=5, help="epoch part: timed pairs")
    parser.add_argument(
        "--max-samples", type=int, default=None, help="epoch part: cap per case (0 = none)"
    )
    parser.add_argument(
        "--tensor-cache",
        type=Path,
        default=None,
        help="epoch part: folder keeping each case's client tensors (built when absent)",
    )
    parser.add_argument("--epochs", type=int, default=1, help="epoch part: epochs per timing")
    parser.add_argument(
        "--cases", default="", help="epoch part: comma-separated case name parts, e.g. P1"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--modes",
        default="fp32,fp32+cl,bf16,bf16+cl",
        help=f"precision parts: comma-separated of {list(PRECISION_MODES)} (first = reference)",
    )
    parser.add_argument("--tag", default="", help="suffix of the stored part's name")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds per run (sim 3, sim100 5, deploy 5)"
    )
    parser.add_argument(
        "--client-cpus", default="1", help="simulation: comma-separated CPUs per client"
    )
    parser.add_argument(
        "--poll-intervals",
        default="0.1",
        help="simulation: comma-separated federation.poll_interval values (3.0 = Flower's own)",
    )
    parser.add_argument(
        "--before", type=Path, default=None, help="deploy: an older checkout to compare"
    )
    parser.add_argument("--trials", type=int, default=1, help="deploy: alternations")
    parser.add_argument(
        "--archs", default="cnn,cnn-unpadded", help="floor: comma-separated CNN layouts"
    )
    parser.add_argument(
        "--clients", default="100,300,1000", help="crossdevice: comma-separated federation sizes"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="deploy, floor: an older checkout run with the same settings as this one",
    )
    parser.add_argument(
        "--evaluation",
        action="store_true",
        help="deploy: alternate federation.evaluation=separate and in-train (this checkout)",
    )
    args = parser.parse_args(argv)
    data_root = str(Path(args.data_root).resolve())
    if args.threads:
        torch.set_num_threads(args.threads)
    needs_data = args.part in (
        "sim",
        "sim100",
        "floor",
        "crossdevice",
        "all",
        "precision",
        "precision-rounds",
    ) or (args.part == "epoch" and args.tensor_cache is None)
    if needs_data and not Path(data_root, "mnist").is_dir():
        parser.error(f"--data-root: no mnist folder in {data_root} (see ../shared/data/README.md)")
    if args.part == "report":
        store_section()
        return 0
    command = "python -m tools.bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    cpus = [int(c) for c in args.client_cpus.split(",")]
    polls = [float(p) for p in args.poll_intervals.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    todo = ["epoch", "sim", "sim100", "deploy"] if args.part == "all" else [args.part]
    for part in todo:
        print(f"== {part}", flush=True)
        if part == "epoch":
            result = bench_epoch(
                data_root,
                args.device,
                args.repeats,
                args.max_samples,
                args.tensor_cache,
                args.epochs,
                [c for c in args.cases.split(",") if c],
            )
        elif part == "sim":
            result = bench_simulation(data_root, args.rounds or 3, 20, 1.0, cpus, polls)
        elif part == "sim100":
            result = bench_simulation(data_root, args.rounds or 5, 100, 0.1, cpus, polls)
        elif part == "floor":
            archs = [a for a in args.archs.split(",") if a]
            base = args.baseline.resolve() if args.baseline else None
            result = bench_round_floor(data_root, archs, args.rounds or 3, args.rounds or 3, base)
        elif part in ("precision", "precision-rounds") and not set(modes) <= set(PRECISION_MODES):
            parser.error(f"--modes: {modes} not all of {list(PRECISION_MODES)}")
        elif part == "precision":
            result = bench_precision(data_root, args.repeats, modes, args.max_samples)
        elif part == "precision-rounds":
            result = bench_precision_rounds(data_root, args.rounds or 1, modes)
        elif part == "crossdevice":
            counts = [int(c) for c in args.clients.split(",") if c]
            result = bench_cross_device(data_root, args.rounds or 10, counts)
        elif args.baseline is not None:  # another checkout, with the same tuned settings
            result = bench_deployment(
                {"baseline": args.baseline.resolve(), "current": ROOT},
                args.rounds or 5,
                args.trials,
            )
        elif args.evaluation:  # one app, its two evaluation modes alternated
            result = bench_deployment(
                {"separate": ROOT, "in-train": ROOT},
                args.rounds or 5,
                args.trials,
                {m: {"federation.evaluation": m} for m in ("separate", "in-train")},
            )
        else:
            dirs = {"after": ROOT}
            if args.before is not None:
                dirs = {"before": args.before.resolve(), "after": ROOT}
            result = bench_deployment(dirs, args.rounds or 5, args.trials)
        store(part + (f"-{args.tag}" if args.tag else ""), result, command)
    print(render({p.stem: json.loads(p.read_text()) for p in sorted(STORE.glob("*.json"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
