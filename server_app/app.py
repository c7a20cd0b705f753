"""The FML ServerApp: validate, build (or resume) the global model, run, save results."""

from __future__ import annotations

import json
import multiprocessing
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fml_flower.checkpoint import load_checkpoint
from fml_flower.config import (
    SENT_CONFIG_KEY,
    ConfigError,
    DataConfig,
    FMLConfig,
    check_partition_ids,
    config_from_run_config,
    to_yaml,
)
from fml_flower.methods import get_method
from fml_flower.models import build_model, cpu_state_dict, resolve_device
from fml_flower.personal import run_scratch_dir, run_state_dir
from fml_flower.results import RunRecorder, plot_run, summary_table
from fml_flower.tensors import PreparedData
from server_app.grid import PollingGrid
from server_app.participants import PartitionJoins
from server_app.rounds import CHECKPOINT_NAME, CentralEvaluation, _fmt, coverage
from server_app.strategy import make_private, make_strategy
from strategies.robust import ClientsRefused, RobustFedAvg

app = ServerApp()


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float) -> int:
    """Wait until at least ``min_nodes`` nodes are connected; return how many are."""
    deadline = time.monotonic() + timeout
    while (n := len(list(grid.get_node_ids()))) < min_nodes:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {n} node(s) connected after {timeout:.0f} s, federation.min_nodes="
                f"{min_nodes}; start more SuperNodes or lower federation.min_nodes"
            )
        time.sleep(0.5)
    return n


def run_dir_for(cfg: FMLConfig) -> Path:
    """The folder this run writes to (absolute)."""
    name = cfg.output.run_name or f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.experiment}"
    return (Path(cfg.output.dir).expanduser() / name).resolve()


@dataclass
class ResumePoint:
    """Where a resumed run starts: the last finished round and its global model."""

    round: int
    arrays: dict
    rounds: list[dict]
    source: Path


def resume_point(cfg: FMLConfig) -> ResumePoint | None:
    """The checkpoint named by ``federation.resume_from`` (a run folder), if any."""
    if not cfg.federation.resume_from:
        return None
    folder = Path(cfg.federation.resume_from).expanduser().resolve()
    path = folder / CHECKPOINT_NAME
    if not path.is_file():
        raise ConfigError(f"federation.resume_from: no {CHECKPOINT_NAME} in {folder}")
    ckpt = load_checkpoint(path)
    if ckpt.get("meme") != cfg.model.meme or ckpt.get("method") != cfg.train.method:
        raise ConfigError(
            f"federation.resume_from: the checkpoint is a {ckpt.get('method')} run with meme "
            f"'{ckpt.get('meme')}', this run is {cfg.train.method} with '{cfg.model.meme}'"
        )
    done = int(ckpt["round"])
    if done >= cfg.federation.num_rounds:
        raise ConfigError(
            f"federation.resume_from: {folder.name} already finished round {done} of "
            f"federation.num_rounds={cfg.federation.num_rounds}; raise num_rounds to go on"
        )
    rounds = json.loads((folder / "metrics.json").read_text())["rounds"]
    return ResumePoint(done, ckpt["arrays"], [r for r in rounds if r["round"] <= done], folder)


def _prepare(cfg: DataConfig, num_nodes: int, partitions: Path | None) -> PreparedData:
    from fml_flower.data import prepare_federation  # the dataset libraries, only here

    return prepare_federation(cfg, num_nodes, partitions)


def prepare_data(
    cfg: DataConfig, num_nodes: int, partitions: Path | None, in_child: bool
) -> PreparedData:
    """:func:`fml_flower.data.prepare_federation`, in a child process with ``in_child``:
    the ServerApp then never imports the dataset libraries (``datasets``,
    ``flwr_datasets``: about 250 MB resident) nor keeps the training split, its partitioner
    and the clients' tensors it wrote; it gets back the split records and the central test
    set. A ``ConfigError`` of the check reaches the caller as it is.
    """
    if not in_child:
        return _prepare(cfg, num_nodes, partitions)
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing inherited
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(_prepare, cfg, num_nodes, partitions).result()


def run_fml(
    grid: Grid, cfg: FMLConfig, run_id: int | None = None, prepare_in_child: bool = False
) -> Path:
    """Run ``train.method`` (see :func:`_run_fml`); when the run ends, successful or not,
    the scratch state of run ``run_id`` (its clients that keep their state neither in a
    node ``state-dir`` nor in ``federation.state_dir``) is removed from this machine: in
    simulation, every client's.
    """
    try:
        return _run_fml(grid, cfg, run_id, prepare_in_child)
    finally:
        if run_id is not None and run_scratch_dir(run_id).exists():
            shutil.rmtree(run_scratch_dir(run_id))


def _run_fml(grid: Grid, cfg: FMLConfig, run_id: int | None, prepare_in_child: bool) -> Path:
    """Run ``train.method`` for ``federation.num_rounds`` rounds; return the results folder.

    Everything is validated (configuration, data, partitions, resume checkpoint) before the
    results folder is created and before any client trains. In simulation (Flower's
    in-memory grid: every client on this machine) the clients' ready partitions are written
    once to the run's state folder (``federation.state_dir`` or the run's scratch folder),
    where the simulated clients read them. ``prepare_in_child`` (the ServerApp's setting):
    the data is prepared in a child process (:func:`prepare_data`). Without ``run_id`` the
    server writes no partitions: each client builds its own.
    """
    t0 = time.monotonic()
    method = get_method(cfg.train.method)
    random.seed(cfg.seed)  # Flower samples nodes with the random module: make it reproducible
    try:  # the central evaluation runs here, on train.device: fail before any folder
        resolve_device(cfg.train.device)
    except ValueError as err:
        raise ConfigError(
            f"train.device: {err} (on the server, for the central evaluation)"
        ) from err
    resume = resume_point(cfg)
    num_nodes = wait_for_nodes(grid, cfg.federation.min_nodes, cfg.federation.round_timeout)
    check_partition_ids(cfg, num_nodes)  # a key naming a client that does not exist
    # stops a split missing a class; in simulation, hands the clients their partitions
    partitions = None
    if run_id is not None and isinstance(grid, InMemoryGrid) and not cfg.data.name_per_client:
        partitions = run_state_dir(cfg.federation.state_dir, run_id) / "partitions"
    t_data = time.monotonic()
    data = prepare_data(cfg.data, num_nodes, partitions, in_child=prepare_in_child)
    split = data.split
    if partitions is not None:
        log(
            INFO,
            "Simulation: %d client partitions ready in %s (data prepared in %.1fs)",
            num_nodes,
            partitions,
            time.monotonic() - t_data,
        )
    meme = build_model(cfg.model.meme, data.info.input_shape, data.info.num_classes, seed=cfg.seed)
    offset = 0
    if resume is not None:
        result = meme.load_state_dict(resume.arrays, strict=False)
        private = set(method.private_keys(cfg, meme))
        if set(result.missing_keys) - private or result.unexpected_keys:
            raise ConfigError(
                f"federation.resume_from: the checkpoint does not fit model.meme "
                f"'{cfg.model.meme}' (missing {result.missing_keys}, unexpected "
                f"{result.unexpected_keys})"
            )
        offset = resume.round
    grid = PollingGrid(grid, cfg.federation.poll_interval)
    joins = None
    if cfg.federation.join_round:  # learn node -> partition now: fail before any training
        joins = PartitionJoins(
            grid, cfg.federation.join_round, cfg.federation.round_timeout, round_offset=offset
        )
        joins.rounds_of(list(grid.get_node_ids()))
        joins.check_known()
    strategy = make_strategy(cfg, method, meme, round_offset=offset, participation=joins)
    released = sum(1 for r in resume.rounds if r.get("privacy_released")) if resume else 0
    try:  # e.g. Flower's adaptive clipping refusing a noise multiplier: before any folder
        served = make_private(cfg, strategy, num_nodes, prior_releases=released)
    except ValueError as err:
        raise ConfigError(f"privacy: {err}") from err
    run_dir = run_dir_for(cfg)
    recorder = RunRecorder(
        run_dir,
        {
            "experiment": cfg.experiment,
            "method": cfg.train.method,
            "started": datetime.now().isoformat(timespec="seconds"),
            "num_nodes": num_nodes,
            "split": split,
            "last_batch": cfg.train.last_batch,
            "input_shape": list(data.info.input_shape),
            "num_classes": data.info.num_classes,
            # as configured: a path relative to the SuperLink's folder stays relative, so
            # the committed metrics name no machine's folder
            "resumed_from": cfg.federation.resume_from if resume else None,
        },
        to_yaml(cfg),
        tensorboard=cfg.output.tensorboard,
    )
    if resume is not None:
        recorder.rounds.extend(resume.rounds)
    log(
        INFO,
        "%s: %d nodes, data %s/%s (%s), meme %s, local %s; %sresults in %s",
        cfg.train.method.upper(),
        num_nodes,
        cfg.data.source,
        cfg.data.name,
        cfg.data.partitioner,
        cfg.model.meme,
        cfg.model.local,
        f"resuming after round {offset}; " if resume else "",
        run_dir,
    )

    sent = {SENT_CONFIG_KEY: to_yaml(cfg).encode()}  # the clients use it (bytes: not logged)
    central = CentralEvaluation(
        cfg,
        method,
        data,
        strategy,
        recorder,
        round_offset=offset,
        resumed=bool(resume),
        num_clients=num_nodes,
        sent_config=sent,
    )
    timeout = cfg.federation.round_timeout
    stopped: str | None = None
    try:
        served.start(
            grid=grid,
            initial_arrays=ArrayRecord(cpu_state_dict(meme)),
            num_rounds=cfg.federation.num_rounds - offset,
            timeout=timeout,
            train_config=ConfigRecord(sent),
            evaluate_config=ConfigRecord(sent),
            evaluate_fn=central,
        )
        stopped = getattr(served, "stopped", None)  # a privacy budget: a configured end
        if stopped:
            central.evaluate_last(grid, timeout)
    except Exception as err:  # the run failed: write what it did, then fail with its reason
        if isinstance(err, ClientsRefused):  # the clients are there: score the last round
            try:
                central.evaluate_last(grid, timeout)
            except Exception as late:  # the run fails with the clients' reason, not this one
                log(WARNING, "scoring the last round before stopping failed too: %r", late)
        end_run(cfg, recorder, strategy, t0, offset, failure=f"{type(err).__name__}: {err}")
        raise
    end_run(cfg, recorder, strategy, t0, offset, stopped=stopped)
    for line in summary_table(recorder.rounds).splitlines():
        log(INFO, "  %s", line)
    final = recorder.rounds[-1]
    covered = coverage(final, num_nodes)
    short = final.get("clients_evaluated") and final["clients_evaluated"] < num_nodes
    log(
        WARNING if short else INFO,
        "%s finished in %.0fs. Final round %d: personalized %s, global(clients) %s%s, "
        "global(central) %s. Results: %s",
        cfg.train.method.upper(),
        time.monotonic() - t0,
        final["round"],
        _fmt(final.get("personal_acc")),
        _fmt(final.get("global_acc")),
        f" ({covered}{': FEWER than the federation' if short else ''})" if covered else "",
        _fmt(final.get("central_acc")),
        run_dir,
    )
    return run_dir


def end_run(
    cfg: FMLConfig,
    recorder: RunRecorder,
    strategy: RobustFedAvg,
    t0: float,
    offset: int,
    stopped: str | None = None,
    failure: str | None = None,
) -> None:
    """Write the run's end into ``metrics.json`` (``finished``: the time, or ``false`` with
    ``failed``: the reason), with the clients that failed in every round they were sampled
    (``failing_clients``; the strategy named them in the log as its ``start`` ended), and
    draw the plots.
    """
    failing = strategy.persistent_failures()
    now = datetime.now().isoformat(timespec="seconds")
    done = recorder.rounds[-1]["round"] - offset if recorder.rounds else 0
    info: dict = {"seconds": time.monotonic() - t0, "rounds_completed": done}
    if failure is None:
        info["finished"] = now
    else:
        info.update(finished=False, ended=now, failed=failure)
    if stopped:
        info["stopped"] = stopped
    if failing:
        info["failing_clients"] = failing
    recorder.finish(**info)
    if cfg.output.plot and len(recorder.rounds) > 1:
        try:
            plot_run(recorder.run_dir)
        except Exception as err:  # a failed plot must not hide the run's own failure
            if failure is None:
                raise
            log(WARNING, "plotting the stopped run failed too: %r", err)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of the ServerApp."""
    run_fml(grid, config_from_run_config(context.run_config), context.run_id, prepare_in_child=True)
