"""The README: its plug-in section runs, block by block, in real Flower simulations; its
quick start and test command are what CI runs; it stays a five-minute read.

The plug-in section's ``python`` blocks are marked ``<!-- snippet: NAME -->``. ``base``,
``server`` and ``client`` make one app module; a feature block (``node-local``, ``robust``,
``dp``, ``schedules``) is appended to it and redefines the function it is about
(``make_strategy`` or ``make_state``), as a reader would paste it.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def snippets() -> dict[str, str]:
    """The README's marked code blocks, by name."""
    text = README.read_text()
    found = re.findall(r"<!-- snippet: ([\w-]+) -->\n```python\n(.*?)```", text, flags=re.S)
    return dict(found)


def test_readme_is_a_five_minute_read() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 400, f"README.md has {len(lines)} lines"
    for section in (
        "## Quick start",
        "## Use the strategy in your own Flower app",
        "## Experimental Setup",
        "## Environment Setup",
        "## Running the Experiments",
        "## Expected Results",
    ):
        assert section in lines, section
    names = {"base", "server", "client", "node-local", "robust", "dp", "schedules"}
    assert set(snippets()) == names


def app_module(tmp_path: Path, *extra: str) -> ModuleType:
    """The README's app (``base`` + ``server`` + ``client`` + the ``extra`` blocks) as an
    importable module, shipped by value to the simulation's workers.
    """
    import ray.cloudpickle

    blocks = snippets()
    code = "\n\n".join(blocks[name] for name in ("base", "server", "client", *extra))
    name = "readme_app_" + "_".join(e.replace("-", "_") for e in extra or ("basic",))
    name += f"_{len(sys.modules)}"  # a fresh module each time
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    ray.cloudpickle.register_pickle_by_value(module)
    return module


def run(module: ModuleType):  # type: ignore[no-untyped-def]
    """Run the module's ServerApp and ClientApp in a simulation of 4 clients; return the
    strategy the ServerApp built.
    """
    from flwr.simulation import run_simulation

    built = []
    make = module.make_strategy

    def keep() -> object:
        built.append(make())
        return built[-1]

    module.make_strategy = keep
    run_simulation(
        module.server,
        module.client,
        num_supernodes=4,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    assert built, "the ServerApp did not build its strategy (it failed before; see the log)"
    return built[0]


def finals(strategy) -> dict[int, dict[str, float]]:  # type: ignore[no-untyped-def]
    results = strategy.client_results(3)
    assert sorted(results) == [0, 1, 2, 3], results  # keyed by partition id
    return results


@pytest.mark.simulation
def test_the_basic_app_runs_and_two_runs_give_the_same_numbers(tmp_path: Path) -> None:
    first = finals(run(app_module(tmp_path / "a")))
    assert all(m["personal_acc"] > 0.9 for m in first.values()), first  # two digits each
    second = finals(run(app_module(tmp_path / "b")))
    assert first == second  # reproducible: seeded models, batch order, partition order


@pytest.mark.simulation
@pytest.mark.slow
def test_node_local_state_and_schedules(tmp_path: Path) -> None:
    import tempfile

    module = app_module(tmp_path, "node-local", "schedules")
    strategy = run(module)
    assert all(m["personal_acc"] > 0.9 for m in finals(strategy).values())
    sent = [strategy.round_log(r).sent for r in (1, 2, 3)]
    assert [s["alpha"] for s in sent] == [0.9, 0.7, 0.5]
    assert [s["beta"] for s in sent] == [0.1, 0.5, 0.5]
    used = strategy.round_log(2).train_clients[1]
    assert used["alpha"] == 0.7 and used["beta"] == 0.5  # what the client trained with
    scratch = Path(tempfile.gettempdir()) / "fml-flower-state"  # removed at the end
    assert not any(scratch.glob("run-*/personal-p*.ckpt"))


@pytest.mark.simulation
@pytest.mark.slow
def test_robust_aggregation(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    strategy = run(app_module(tmp_path, "robust"))
    assert repr(strategy.aggregator) == "TrimmedMean(0.25)"
    assert all(strategy.round_log(r).aggregated for r in (1, 2, 3))
    assert all(m["personal_acc"] > 0.9 for m in finals(strategy).values())


@pytest.mark.simulation
def test_the_dp_example_runs_to_the_end_on_a_small_cnn_federation(tmp_path: Path) -> None:
    """The README's DP values (z = 1, C = 1, 4 clients): the noise swamps the global model,
    yet no client fails, every round is released and the personalized models learn.
    """
    import math

    strategy = run(app_module(tmp_path, "dp"))
    assert strategy.stopped is None
    epsilon = strategy.epsilon()
    assert epsilon is not None and math.isfinite(epsilon) and epsilon > 0
    logs = [strategy.round_log(r) for r in (1, 2, 3)]
    assert all(book.train_accepted == 4 and not book.failed for book in logs)
    assert all(book.privacy["privacy_released"] == 1.0 for book in logs)
    assert all(m["personal_acc"] > 0.8 for m in finals(strategy).values())
