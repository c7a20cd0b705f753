"""Run a sweep of (method x setting) runs through Flower's simulation engine.

    python -m tools.experiments p1                 # conf/sweeps/p1.yaml
    python -m tools.experiments p1 --only fml fedavg --out docs/results
    python -m tools.experiments p5 --collect-from ../runs5/docs/results  # finished runs only

One SuperLink (simulation, loopback, private FLWR_HOME) serves the runs one after another.
A run whose ``metrics.json`` is complete is skipped, so an interrupted sweep resumes where it
stopped. Every run keeps its clients' personalized state in ``<out>/<sweep>/.state/<run>``
(``federation.state_dir``), so a run cut in the middle (a session's end, a killed process)
continues from its last checkpointed round (``federation.resume_from``) instead of starting
over; its ``metrics.json`` lists every attempt (``attempts``: the round it started from, the
commit, the machine). A folder that cannot be continued (no checkpoint or no state) is moved
aside and the run starts again. The state folder is removed when its run completes.

Long sweeps run in a separate clone (the SuperLink imports the ClientApp from its working
directory, so editing the main checkout would change a running sweep); ``--collect-from``
copies that clone's finished runs into this checkout, without checkpoints or clients' state.

At the end the sweep writes
``<out>/<sweep>/results.md`` (a table of final-round numbers) and ``accuracy.png`` (every
run's accuracy per round), from the ``metrics.json`` files alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml

from fml_flower.config import CONF_DIR, ConfigError, load_config, read_run_config
from tools.bench import machine
from tools.launch import run_app, run_status, simulation_superlink

ROOT = CONF_DIR.parent


@dataclass
class RunSpec:
    """One run of a sweep."""

    name: str
    experiment: str
    overrides: dict[str, Any] = field(default_factory=dict)
    supernodes: int = 2
    num_cpus: int = 1
    """Each simulated client's CPU share: cores / num_cpus clients train at once."""
    num_gpus: float | None = None
    """Each simulated client's GPU share (``client-resources-num-gpus``); None: decided by
    :func:`client_gpu_share` from the GPUs this machine has."""


def load_sweep(name: str, conf_dir: Path = CONF_DIR) -> list[RunSpec]:
    """The runs of ``conf/sweeps/<name>.yaml``, each validated as a configuration."""
    path = conf_dir / "sweeps" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (conf_dir / "sweeps").glob("*.yaml"))
        raise ConfigError(f"sweep: no file {path}; available: {known}")
    spec = yaml.safe_load(path.read_text()) or {}
    supernodes = int(spec.get("supernodes", 2))
    num_cpus = int(spec.get("num_cpus", 1))
    num_gpus = spec.get("num_gpus")
    common = dict(spec.get("overrides", {}))  # every run's, under its own
    runs = []
    for item in spec.get("runs", []):
        run = RunSpec(
            item["name"],
            item.get("experiment", "base"),
            {**common, **dict(item.get("overrides", {}))},
            int(item.get("supernodes", supernodes)),
            int(item.get("num_cpus", num_cpus)),
            _gpu_share(item.get("num_gpus", num_gpus), f"sweep {name}, run {item['name']}"),
        )
        load_config(run.experiment, run.overrides)  # fail before anything runs
        runs.append(run)
    if not runs:
        raise ConfigError(f"sweep {name}: no runs listed")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep {name}: run names must be unique, got {names}")
    return runs


def _gpu_share(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigError(f"{where}: num_gpus must be a number in [0, 1], got {value!r}")
    return float(value)


def client_gpu_share(
    num_gpus: float | None, num_cpus: int, gpus: int | None = None, cores: int | None = None
) -> float:
    """Each simulated client's share of a GPU (Flower's ``client-resources-num-gpus``).

    Given (``num_gpus`` not None), it is used as is; 0 trains on the CPU. Otherwise: 0 on a
    machine without a GPU, and on one with ``gpus`` GPUs, ``gpus`` divided by the number of
    clients the CPUs let train at once (``cores // num_cpus``), so that every one of them
    gets a GPU share. Without a share, Ray hides the GPUs from the clients
    (``CUDA_VISIBLE_DEVICES`` empty) and ``train.device: auto`` trains on the CPU.
    """
    if num_gpus is not None:
        return num_gpus
    gpus = torch_gpus() if gpus is None else gpus
    if gpus == 0:
        return 0.0
    at_once = max(1, (cores or os.cpu_count() or 1) // max(1, num_cpus))
    # rounded down to Ray's resource granularity (1e-4), so that `at_once` clients fit
    return min(1.0, math.floor(gpus / at_once * 1e4) / 1e4)


def torch_gpus() -> int:
    """The number of CUDA GPUs torch sees in this process."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def is_complete(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished run (all rounds and a finish time)."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return False
    rounds, run = metrics.get("rounds", []), metrics.get("run", {})
    if run.get("finished") and "stopped" in run:  # a configured end (a privacy budget)
        return True  # (a failed run has finished: false)
    return bool(run.get("finished")) and len(rounds) == cfg["federation"]["num_rounds"] + 1


class PeakMemory:
    """Peak total resident memory of a process and all its descendants (from /proc), and
    what each process held at that peak (:attr:`breakdown`: name -> MiB, summed over the
    processes of one name).
    """

    def __init__(self, root_pid: int, interval: float = 1.0):
        self.root_pid, self.interval, self.peak_mb = root_pid, interval, 0.0
        self.breakdown: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            processes = tree_processes(self.root_pid)
            total = sum(mb for _, mb in processes)
            if total > self.peak_mb:
                self.peak_mb = total
                by_name: dict[str, float] = {}
                for name, mb in processes:
                    by_name[name] = by_name.get(name, 0.0) + mb
                self.breakdown = dict(sorted(by_name.items(), key=lambda kv: -kv[1]))


def tree_rss_mb(root_pid: int) -> float:
    """Resident memory of ``root_pid`` and its descendants, in MiB (Linux /proc)."""
    return sum(mb for _, mb in tree_processes(root_pid))


def tree_processes(root_pid: int) -> list[tuple[str, float]]:
    """``(name, resident MiB)`` of ``root_pid`` and each of its descendants (Linux /proc).
    The name is the process's title as ``ps`` shows it, shortened to what tells the
    processes of a Flower simulation apart (``flower-superlink``, ``ray::ClientAppActor``,
    ``raylet``, ...).
    """
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
        except OSError:
            continue
        pid, ppid = int(fields["Pid"]), int(fields["PPid"])
        children.setdefault(ppid, []).append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0])
    out, stack = [], [root_pid]
    while stack:
        pid = stack.pop()
        out.append((_process_name(pid), rss.get(pid, 0) / 1024))
        stack.extend(children.get(pid, []))
    return out


def _process_name(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0].split()[0]
    for i, word in enumerate(words[:4]):  # python [-u] <script> / -m <module>: its name
        if word == "-m" and i + 1 < len(words):
            return words[i + 1]
        if word == "-c":  # e.g. multiprocessing's resource tracker
            return "python -c"
        base = Path(word).name
        if base and not base.startswith(("python", "-")):
            return base
    return Path(words[0]).name


def run_sweep(
    name: str,
    out: Path,
    only: list[str] | None = None,
    num_cpus: int | None = None,
    conf_dir: Path = CONF_DIR,
    num_gpus: float | None = None,
) -> Path:
    """Run (or resume) sweep ``name`` (``<conf_dir>/sweeps/<name>.yaml``); return its folder
    under ``out``. ``num_cpus`` and ``num_gpus`` override the sweep's CPU and GPU share per
    simulated client (a GPU share not given anywhere: :func:`client_gpu_share`).
    """
    runs = [r for r in load_sweep(name, conf_dir) if not only or r.name in only]
    if num_cpus is not None:
        runs = [replace(r, num_cpus=num_cpus) for r in runs]
    if num_gpus is not None:
        runs = [replace(r, num_gpus=_gpu_share(num_gpus, "--num-gpus")) for r in runs]
    gpus = torch_gpus()  # asked once, for every run
    runs = [replace(r, num_gpus=client_gpu_share(r.num_gpus, r.num_cpus, gpus)) for r in runs]
    shares = sorted({r.num_gpus for r in runs})
    if shares[-1] > 0 and gpus == 0:  # Ray would wait for a GPU that never comes
        raise ConfigError(
            f"sweep {name}: a GPU share per client ({shares[-1]}) on a machine where torch "
            "sees no GPU; give num_gpus 0 (--num-gpus 0) to train on the CPU"
        )
    print(
        f"sweep {name}: clients train on "
        + ("the CPU" if shares == [0.0] else f"GPU (a share of {shares} GPU each)"),
        flush=True,
    )
    sweep_dir = (out / name).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    todo = [r for r in runs if not is_complete(sweep_dir / r.name)]
    print(f"sweep {name}: {len(runs)} runs, {len(runs) - len(todo)} already complete", flush=True)
    if todo:
        flwr_home = sweep_dir / ".flwr"
        with simulation_superlink(flwr_home, cwd=ROOT) as (connection, superlink_pid):
            for run in todo:
                _run_one(run, sweep_dir, flwr_home, connection, superlink_pid)
    write_report(name, sweep_dir, runs)
    return sweep_dir


STATE_DIR = ".state"
"""Under a sweep's folder: one folder per run with its clients' durable state."""
ATTEMPTS_FILE = "attempts.json"
"""In a run's state folder: what ran it so far (kept until the run completes)."""


def _relative(path: Path) -> str:
    """``path`` relative to the SuperLink's working directory (``ROOT``) when inside the
    checkout: the recorded configuration then names no machine's path.
    """
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def resumable_round(run_dir: Path, state_dir: Path) -> int | None:
    """The round an interrupted run in ``run_dir`` can continue after, or None: it needs
    its checkpoint and its clients' state in ``state_dir``, written by this sweep (its
    ``attempts.json``); a run folder without them starts again.
    """
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if not (run_dir / "checkpoint.ckpt").is_file() or not (state_dir / ATTEMPTS_FILE).is_file():
        return None
    done = [r["round"] for r in metrics.get("rounds", []) if r.get("round", 0) > 0]
    return max(done) if done else None


def _run_one(run: RunSpec, sweep_dir: Path, flwr_home: Path, connection: str, pid: int) -> None:
    run_dir = sweep_dir / run.name
    state_dir = sweep_dir / STATE_DIR / run.name
    attempts_file = state_dir / ATTEMPTS_FILE
    continued = sweep_dir / f".{run.name}.continued"  # a continuation writes a new folder
    if resumable_round(continued, state_dir) is not None:  # an earlier continuation, cut
        shutil.rmtree(run_dir)  # (it holds every round of run_dir)
        continued.rename(run_dir)
    elif continued.exists():
        shutil.rmtree(continued)
    after = resumable_round(run_dir, state_dir) if run_dir.exists() else None
    if after is not None:
        print(f"  {run.name}: continuing after round {after}", flush=True)
        run_config: dict[str, Any] = {
            "federation.resume_from": _relative(run_dir),
            "federation.state_dir": _relative(state_dir),
            "output.dir": _relative(sweep_dir),
            "output.run_name": continued.name,
        }
        attempts = json.loads(attempts_file.read_text()) if attempts_file.is_file() else []
    else:
        if run_dir.exists():
            aside = sweep_dir / f".incomplete-{run.name}-{datetime.now():%Y%m%d%H%M%S}"
            run_dir.rename(aside)
            print(f"  {run.name}: incomplete folder moved to {aside.name}", flush=True)
        if state_dir.exists():
            shutil.rmtree(state_dir)
        print(f"  {run.name}: running ({run.experiment}, {run.overrides})", flush=True)
        run_config = {
            "experiment": run.experiment,
            **run.overrides,
            "output.dir": _relative(sweep_dir),
            "output.run_name": run.name,
            "federation.state_dir": _relative(state_dir),
        }
        attempts = []
    version = code_version(ROOT)  # before the run: the code it runs (a checkout may move on)
    attempts.append(
        {
            "after_round": after or 0,
            "started": f"{datetime.now():%Y-%m-%dT%H:%M:%S}",
            **version,
            "machine": machine(),
        }
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    attempts_file.write_text(json.dumps(attempts, indent=1) + "\n")
    t0 = time.monotonic()
    with PeakMemory(pid) as memory:
        proc = run_app(
            ROOT,
            flwr_home,
            connection,
            run_config,
            run.supernodes,
            timeout=6 * 3600,
            num_cpus=run.num_cpus,
            num_gpus=run.num_gpus or 0.0,
        )
    (sweep_dir / f".{run.name}.log").write_text(proc.stdout + proc.stderr)
    status = sorted(run_status(flwr_home, connection), key=lambda r: r.get("pending-at", ""))
    if after is not None and is_complete(continued):
        shutil.rmtree(run_dir)
        continued.rename(run_dir)
    if proc.returncode != 0 or not is_complete(run_dir):
        raise RuntimeError(
            f"run {run.name} failed (flwr exit {proc.returncode}, status "
            f"{status[-1] if status else '?'}); log: {sweep_dir / f'.{run.name}.log'}"
        )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # the whole run's time: earlier attempts count with their rounds' recorded seconds (their
    # start-up, a few seconds each, is not recorded)
    before = sum(r.get("seconds", 0.0) for r in metrics["rounds"] if r["round"] <= (after or 0))
    metrics["run"].update(
        wall_seconds=time.monotonic() - t0 + before,
        peak_memory_mb=memory.peak_mb,
        supernodes=run.supernodes,
        client_num_cpus=run.num_cpus,
        client_num_gpus=run.num_gpus or 0.0,
        **version,
        machine=machine(),
    )
    if len(attempts) > 1:
        metrics["run"]["attempts"] = attempts
        metrics["run"]["commit"] = attempts[0]["commit"]  # where it started; each in attempts
        # the server counted this attempt's rounds; the run's are every attempt's
        metrics["run"]["rounds_completed"] = metrics["rounds"][-1]["round"]
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    shutil.rmtree(state_dir)
    print(
        f"  {run.name}: done in {time.monotonic() - t0:.0f}s, peak {memory.peak_mb:.0f} MiB",
        flush=True,
    )


APP_PATHS = ("fml_flower", "strategies", "client_app", "server_app", "conf", "pyproject.toml")
"""What a run executes (the FAB's content): a change elsewhere does not change a run."""


def code_version(root: Path) -> dict[str, Any]:
    """The commit the run's code came from (``commit``) and whether the app's files
    differed from it (``code_modified``: a run from an uncommitted tree names the files).
    """

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--", *APP_PATHS).splitlines()
    except (OSError, subprocess.CalledProcessError) as err:
        return {"commit": None, "commit_error": str(err)}
    return {"commit": commit, "code_modified": [line[3:] for line in changed]}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def summarize(run_dir: Path) -> dict[str, Any]:
    """Final-round numbers of one run, as BENCHMARKS.md asks for them."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rounds = [r for r in metrics["rounds"] if r["round"] > 0]
    last = rounds[-1]
    return {
        "rounds": last["round"],
        "personal": last.get("personal_acc"),
        "personal_min": last.get("personal_acc_min"),
        "personal_max": last.get("personal_acc_max"),
        "global_clients": last.get("global_acc"),
        "central": last.get("central_acc"),
        "round_median_s": statistics.median(r["seconds"] for r in rounds),
        "wall_s": metrics["run"].get("wall_seconds"),
        "peak_mb": metrics["run"].get("peak_memory_mb"),
    }


def write_report(name: str, sweep_dir: Path, runs: list[RunSpec]) -> Path:
    """``results.md`` and ``accuracy.png`` of the sweep, from its ``metrics.json`` files."""
    done = [r for r in runs if is_complete(sweep_dir / r.name)]
    lines = [
        f"# Sweep `{name}`",
        "",
        f"Written {datetime.now():%Y-%m-%d %H:%M} by `python -m tools.experiments {name}` "
        "from the runs' `metrics.json`. Accuracies in %, final round; personalized = each "
        "client's model on its own test part (mean weighted by test examples, [min, max] over "
        "clients); global = the global model on the clients' test parts and on the central "
        "test set.",
        "",
        "| run | rounds | personalized | [min, max] | global (clients) | global (central) "
        "| round median (s) | wall (s) | peak memory (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in done:
        s = summarize(sweep_dir / run.name)
        lines.append(
            f"| {run.name} | {s['rounds']} | {_pct(s['personal'])} | "
            f"[{_pct(s['personal_min'])}, {_pct(s['personal_max'])}] | "
            f"{_pct(s['global_clients'])} | {_pct(s['central'])} | {s['round_median_s']:.1f} | "
            f"{s['wall_s'] or 0:.0f} | {s['peak_mb'] or 0:.0f} |"
        )
    missing = [r.name for r in runs if r not in done]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    if done:
        lines += per_client_table(sweep_dir, [r.name for r in done])
        lines += newcomer_table(sweep_dir, [r.name for r in done])
    report = sweep_dir / "results.md"
    report.write_text("\n".join(lines) + "\n")
    if done:
        _plot(sweep_dir, [r.name for r in done])
    return report


def _run_files(run_dir: Path) -> tuple[list[dict], dict]:
    """A finished run's rounds (round 0 left out) and its configuration (over the current
    schema, see :func:`read_run_config`).
    """
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    return [r for r in rounds if r["round"] > 0], read_run_config(run_dir / "config.yaml")


def _client_acc(record: dict, pid: int, key: str = "personal_acc") -> float | None:
    return record.get("clients", {}).get(str(pid), {}).get(key)


def per_client_table(sweep_dir: Path, names: list[str]) -> list[str]:
    """Markdown lines: every client's final-round personalized accuracy in every run, with
    the client's local model and dataset where runs set them per client.
    """
    finals, configs = {}, {}
    for name in names:
        rounds, configs[name] = _run_files(sweep_dir / name)
        finals[name] = rounds[-1].get("clients", {})
    pids = sorted({int(p) for clients in finals.values() for p in clients})
    if not pids:
        return []

    def described(pid: int, section: str, per_client: str, default: str) -> str:
        seen = (str(c[section][per_client].get(pid, c[section][default])) for c in configs.values())
        return " / ".join(dict.fromkeys(seen))  # in run order, each once

    lines = [
        "",
        "## Personalized accuracy per client, final round (%)",
        "",
        "| client | local model | dataset | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for pid in pids:
        accs = [finals[n].get(str(pid), {}).get("personal_acc") for n in names]
        lines.append(
            f"| {pid} | {described(pid, 'model', 'local_per_client', 'local')} | "
            f"{described(pid, 'data', 'name_per_client', 'name')} | "
            + " | ".join(_pct(a) for a in accs)
            + " |"
        )
    return lines


def newcomer_curves(run_dir: Path, key: str = "personal_acc") -> dict[int, list[float | None]]:
    """Accuracy ``key`` (a per-client metric: ``personal_acc`` or ``global_acc``) of each
    client of a run by rounds since it joined (index 0: its first round):
    ``federation.join_round`` clients, and ``-1`` for the mean over the clients that took
    part from round 1 (unweighted).
    """
    rounds, cfg = _run_files(run_dir)
    join = {int(k): int(v) for k, v in (cfg["federation"].get("join_round") or {}).items()}
    curves: dict[int, list[float | None]] = {
        pid: [_client_acc(r, pid, key) for r in rounds if r["round"] >= t]
        for pid, t in join.items()
    }
    incumbents = []
    for r in rounds:
        accs = [
            a
            for p, m in r.get("clients", {}).items()
            if int(p) not in join
            if (a := m.get(key)) is not None
        ]
        incumbents.append(sum(accs) / len(accs) if accs else None)
    curves[-1] = incumbents
    return curves


def newcomer_table(sweep_dir: Path, names: list[str]) -> list[str]:
    """Markdown lines: personalized accuracy by rounds since joining, for runs with
    ``federation.join_round`` (nothing otherwise).
    """
    runs = {}
    for name in names:
        _, cfg = _run_files(sweep_dir / name)
        if cfg["federation"].get("join_round"):
            runs[name] = {
                model: newcomer_curves(sweep_dir / name, f"{model}_acc")
                for model in ("personal", "global")
            }
    if not runs:
        return []
    width = max(len(c) for by in runs.values() for p, c in by["personal"].items() if p >= 0)
    lines = [
        "",
        "## New participants: accuracy by rounds since joining (%)",
        "",
        "Round 1 is the client's first round (its join round), measured after it trained. "
        "`from round 1` is the mean over the clients that took part from the start, at the "
        "same number of rounds since theirs. `global`: the global model (the meme a client "
        "forks) on that client's test part.",
        "",
        "| run | client | model | " + " | ".join(str(k + 1) for k in range(width)) + " |",
        "|---|---|---|" + "---|" * width,
    ]
    for name, by in runs.items():
        for pid in [*sorted(p for p in by["personal"] if p >= 0), -1]:
            for model, curves in by.items():
                values = curves[pid][:width]
                if not any(v is not None for v in values):
                    continue  # e.g. local-only has no global model
                who = "from round 1" if pid < 0 else f"{pid} (joins)"
                cells = [_pct(v) for v in values] + ["-"] * (width - len(values))
                lines.append(f"| {name} | {who} | {model} | " + " | ".join(cells) + " |")
    return lines


def _plot(sweep_dir: Path, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for index, name in enumerate(names):  # one colour per run, the same in both panels
        rounds = json.loads((sweep_dir / name / "metrics.json").read_text())["rounds"]
        for ax, key in zip(axes, ("personal_acc", "global_acc"), strict=True):
            pts = [
                (r["round"], r[key]) for r in rounds if r["round"] > 0 and r.get(key) is not None
            ]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, color=f"C{index}")
    for ax, title in zip(
        axes, ("personalized (own test)", "global model (clients' test)"), strict=True
    ):
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("accuracy")
    fig.tight_layout()
    fig.savefig(sweep_dir / "accuracy.png", dpi=110)
    plt.close(fig)


def collect(name: str, source: Path, out: Path, runs: list[RunSpec]) -> list[str]:
    """Copy the finished runs of sweep ``name`` from ``source/<name>`` (another checkout's
    results folder) into ``out/<name>``; return the names copied.

    Only complete runs (:func:`is_complete`) of this sweep's file are copied, and without
    their checkpoints (``*.ckpt``: binary, large, only for continuing a cut run); runs this
    checkout already has complete are left alone. A run folder here that exists but is not
    complete is never overwritten: a :class:`FileExistsError` names every such folder after
    the others were copied.
    """
    src_dir, dst_dir = (source / name).resolve(), (out / name).resolve()
    if not src_dir.is_dir():
        raise FileNotFoundError(f"--collect-from: no sweep folder {src_dir}")
    if src_dir == dst_dir:
        raise ValueError(f"--collect-from: {src_dir} is this checkout's own sweep folder")
    copied, blocked = [], []
    for run in runs:
        src, dst = src_dir / run.name, dst_dir / run.name
        if not is_complete(src) or is_complete(dst):
            continue
        if dst.exists():
            blocked.append(str(dst))
            continue
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.ckpt"))
        copied.append(run.name)
    if blocked:
        raise FileExistsError(
            "--collect-from: these run folders exist here but are not complete; move them "
            f"away first (copied {len(copied)} others): {', '.join(blocked)}"
        )
    return copied


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="name of conf/sweeps/<sweep>.yaml")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "docs" / "results",
        help="parent folder of the sweep's folder (default docs/results)",
    )
    parser.add_argument("--only", nargs="*", help="run only these run names")
    parser.add_argument(
        "--num-cpus",
        type=int,
        help="CPU share of each simulated client (cores / this = clients at once); "
        "default: the sweep file's num_cpus, else 1",
    )
    parser.add_argument(
        "--num-gpus",
        type=float,
        help="GPU share of each simulated client (0: train on the CPU); default: the sweep "
        "file's num_gpus, else every client that can train at once gets a share of this "
        "machine's GPUs (none: CPU)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite results.md/accuracy.png from existing runs",
    )
    parser.add_argument(
        "--collect-from",
        type=Path,
        metavar="RESULTS",
        help="copy this sweep's finished runs from RESULTS/<sweep> (another checkout's "
        "results folder, e.g. a run clone's docs/results) into --out, without checkpoints",
    )
    args = parser.parse_args(argv)
    if args.collect_from is not None:
        runs = load_sweep(args.sweep)
        copied = collect(args.sweep, args.collect_from, args.out, runs)
        done = sum(is_complete((args.out / args.sweep / r.name).resolve()) for r in runs)
        print(f"copied {len(copied)}: {' '.join(copied) or '-'}")
        print(f"sweep {args.sweep}: {done} / {len(runs)} runs complete here")
        return 0
    if args.report_only:
        print(write_report(args.sweep, (args.out / args.sweep).resolve(), load_sweep(args.sweep)))
        return 0
    sweep_dir = run_sweep(args.sweep, args.out, args.only, args.num_cpus, num_gpus=args.num_gpus)
    print(sweep_dir / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
