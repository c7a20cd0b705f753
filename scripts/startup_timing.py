"""What a fresh ClientApp process pays before it trains: imports, then its data, for two
checkouts side by side (deployment starts one such process per message).

    python scripts/startup_timing.py --before /path/to/old/checkout --repeats 5

Each measurement is a new Python process in that checkout (its code comes first on the
path): (1) ``import client_app.app``; (2) that import plus client 3's P1 partition,
the way the first message of a node loads it; (3) the same again, as every later message
of a node does (the new code reads the node's partition cache in ``state-dir``; the old
code re-partitions). Prints medians and writes ``docs/performance/startup.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import sys, time
t0 = time.perf_counter()
import client_app.app as c
t1 = time.perf_counter()
if sys.argv[1] != "import":
    from fml_flower.config import load_config
    cfg = load_config("p1", {"data.root": sys.argv[2]})
    args = (cfg, 3, 20) + ((c.Path(sys.argv[3]),) if sys.argv[3] != "-" else ())
    c.client_data(*args)
print(t1 - t0, time.perf_counter() - t0)
"""


def probe(checkout: Path, what: str, data_root: str, cache: str) -> tuple[float, float]:
    """Run the probe in a fresh process inside ``checkout``; (import s, total s)."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, what, data_root, cache],
        cwd=checkout,
        capture_output=True,
        text=True,
        check=True,
    )
    first, total = out.stdout.split()[-2:]
    return float(first), float(total)


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    data_root = str(Path(args.data_root).resolve())
    trees = {"before": args.before.resolve(), "after": ROOT}
    results: dict[str, dict[str, list[float]]] = {k: {} for k in trees}
    with tempfile.TemporaryDirectory() as cache:
        probe(ROOT, "data", data_root, cache)  # the new code's node builds its cache once
        for _ in range(args.repeats):
            for label, tree in trees.items():
                uses_cache = label == "after" and (tree / "fml_flower" / "tensors.py").exists()
                imp, _ = probe(tree, "import", data_root, "-")
                _, first = probe(tree, "data", data_root, "-")
                _, later = probe(tree, "data", data_root, cache if uses_cache else "-")
                for key, value in (("import", imp), ("first", first), ("later", later)):
                    results[label].setdefault(key, []).append(value)
    medians = {
        label: {k: statistics.median(v) for k, v in parts.items()}
        for label, parts in results.items()
    }
    entry = {
        "date": datetime.now().isoformat(timespec="minutes"),
        "command": "python scripts/startup_timing.py " + " ".join(sys.argv[1:]),
        "trees": {k: str(v) for k, v in trees.items()},
        "seconds": results,
        "medians": medians,
    }
    out = ROOT / "docs" / "performance" / "startup.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(entry, indent=1) + "\n")
    for label, m in medians.items():
        print(
            f"{label}: import {m['import']:.2f} s, import + first data {m['first']:.2f} s, "
            f"import + later data {m['later']:.2f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
