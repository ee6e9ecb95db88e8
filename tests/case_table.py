"""Multi-rank test scenarios as tables of named case functions, all run by one spawned group.

A ``*_cases.py`` module declares ``TABLE = CaseTable(__name__)`` and registers its scenarios with
``@TABLE.case``: each is a plain module-level function ``case(tmp: Path) -> result`` (picklable
plain data), named for what it runs. The test module spawns the group once
(``TABLE.spawn(tmp)``: the process group is joined once, then every case runs in registration
order on every rank, each in its own folder ``tmp/<case name>``) and each test asserts on the case
function it names: ``group[cases.dp2_distopt]`` (rank 0's result) or
``group.ranks(cases.neftune_probe_tp2)`` (every rank's). A case that raised is reported by the test
that asks for it, with the rank's traceback; the other cases' tests still run.
"""

from __future__ import annotations

import importlib
import pickle
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest


class CaseFailed:
    """What a case that raised leaves in the results: its traceback."""

    def __init__(self, text: str):
        self.text = text


class CaseTable:
    def __init__(self, module: str):
        self.module = module
        self.cases: dict[str, Callable[[Path], Any]] = {}

    def case(self, fn: Callable[[Path], Any]) -> Callable[[Path], Any]:
        if fn.__name__ in self.cases:
            raise ValueError(f"{self.module}: two cases named {fn.__name__}")
        self.cases[fn.__name__] = fn
        return fn

    def spawn(self, tmp: str | Path, world_size: int = 2, names: list[str] | None = None,
              **kwargs) -> "Outcome":
        """Run the cases (all, or ``names``) on ``world_size`` spawned gloo ranks."""
        from clinmega.runtime.local_group import run_local_group

        names = list(self.cases) if names is None else names
        unknown = sorted(set(names) - set(self.cases))
        if unknown:
            raise KeyError(f"{self.module}: no cases {unknown}")
        ranks = run_local_group(run_table, world_size, (self.module, str(tmp), names), **kwargs)
        return Outcome(self, [pickle.loads(r) for r in ranks])


def run_table(module: str, tmp: str, names: list[str]) -> bytes:
    """What each spawned rank runs: join the group once, then every named case in order. The
    results come back pickled by value (tensors inline, not as shared-memory handles that die
    with the rank)."""
    import torch.distributed as dist

    from clinmega.config import RuntimeConfig
    from clinmega.runtime import init_process_group

    table: CaseTable = importlib.import_module(module).TABLE
    init_process_group(RuntimeConfig())
    out: dict[str, Any] = {}
    for name in names:
        folder = Path(tmp) / name
        folder.mkdir(parents=True, exist_ok=True)
        try:
            out[name] = table.cases[name](folder)
        except Exception:  # the case's tests report it; the next case starts from a barrier
            out[name] = CaseFailed(traceback.format_exc())
        dist.barrier()
    return pickle.dumps(out)


class Outcome:
    """Per-case results of one spawned group."""

    def __init__(self, table: CaseTable, ranks: list[dict[str, Any]]):
        self.table, self._ranks = table, ranks

    def ranks(self, case: Callable) -> list[Any]:
        name = case.__name__
        if self.table.cases.get(name) is not case:
            raise KeyError(f"{case!r} is not a case of {self.table.module}")
        values = [r[name] for r in self._ranks]
        for rank, value in enumerate(values):
            if isinstance(value, CaseFailed):
                pytest.fail(f"case {name} failed on rank {rank}:\n{value.text}", pytrace=False)
        return values

    def __getitem__(self, case: Callable) -> Any:
        return self.ranks(case)[0]
