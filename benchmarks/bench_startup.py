"""Start-up time of the ``clinmega`` command against a bare interpreter.

Times (median of N runs, alternating so machine noise hits all alike) of

* ``python -c pass`` (the floor),
* ``clinmega --help`` (builds the parser of every verb),
* ``clinmega plot RUN`` on a 100-step metrics log (reads JSONL, draws a PNG with matplotlib),
* ``python -c "import matplotlib.pyplot"`` (plot's own floor: the drawing library),

printed as seconds and as ratios to ``python -c pass``. Run from the repository root::

    PYTHONPATH=. python benchmarks/bench_startup.py [N]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(n: int = 5) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 8.0 / (1 + s / 20), "lr": 1e-4}) + "\n" for s in range(1, 101)))
        py = sys.executable
        cases = {
            "python -c pass": [py, "-c", "pass"],
            "clinmega --help": [py, "-m", "clinmega.cli", "--help"],
            "clinmega plot RUN": [py, "-m", "clinmega.cli", "plot", str(run)],
            "python -c 'import matplotlib.pyplot'": [py, "-c", "import matplotlib.pyplot"],
        }
        for argv in cases.values():  # warm the page cache and .pyc files
            timed(argv, env)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(n):
            for name, argv in cases.items():
                times[name].append(timed(argv, env))
    floor = statistics.median(times["python -c pass"])
    print(f"start-up, median of {n} runs ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}):")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"  {name:40s} {median:6.3f} s   {median / floor:5.2f}x python -c pass")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
