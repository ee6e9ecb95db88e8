"""The run's metrics log ``RUN/metrics.jsonl``: one JSON record per logged step. Written by
:mod:`clinmega.training.logging`, read here without torch (``clinmega plot`` starts instantly)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's step records, merged per step (train and validation records of a step; a step
    logged again by a resumed run keeps the newer values)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics log (is {run_dir} a clinmega train run dir?)")
    by_step: dict[int, dict] = {}
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                continue  # the last line, cut short by a kill
            raise ValueError(f"{path}:{n}: not JSON") from None
        by_step.setdefault(record["step"], {}).update(record)
    return [by_step[s] for s in sorted(by_step)]
