"""Run a function on N local processes that form a real torch.distributed group.

Used by the multi-rank tests and by CPU demos: each child gets torchrun-style environment variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so it initialises through the same
:func:`clinmega.runtime.initialize` as a torchrun or Slurm job. Results come back in rank order; an
exception in any rank is re-raised in the parent with that rank's traceback.
"""

from __future__ import annotations

import os
import queue
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from clinmega.runtime.distributed import _free_port


def _child(fn, rank, world_size, port, env, results, args):
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from clinmega.utils.quiet import apply_in_worker

    apply_in_worker()  # a quiet parent command counts this rank's library warnings too
    try:
        results.put((rank, True, fn(*args)))
    except BaseException:  # report everything, including SystemExit/KeyboardInterrupt
        results.put((rank, False, traceback.format_exc()))
        raise SystemExit(1)
    finally:
        from clinmega.runtime.distributed import shutdown

        shutdown()


def run_local_group(fn: Callable[..., Any], world_size: int = 2, args: tuple = (),
                    env: dict[str, str] | None = None, timeout: float = 1200.0) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` spawned ranks; return their results in rank order.

    ``fn`` must be importable (module level). Each rank should call
    :func:`clinmega.runtime.initialize` itself. ``OMP_NUM_THREADS`` defaults to 1 per rank.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child_env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, child_env, results, args),
                         daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    outcome: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcome) < world_size:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if r not in outcome and p.exitcode not in (None, 0)]
                if dead:  # died without reporting (killed, or failed while starting up)
                    outcome[dead[0]] = (False, f"exited with code {procs[dead[0]].exitcode} "
                                               "before reporting a result")
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"local group: no result from ranks "
                                       f"{sorted(set(range(world_size)) - set(outcome))} "
                                       f"within {timeout:.0f}s") from None
                continue
            outcome[rank] = (ok, value)
            if not ok:
                break  # the other ranks are probably blocked in a collective
    finally:
        all_ok = len(outcome) == world_size and all(ok for ok, _ in outcome.values())
        for p in procs:
            p.join(timeout=60 if all_ok else 5)
            if p.is_alive():
                p.terminate()
                p.join()
    failed = {r: v for r, (ok, v) in outcome.items() if not ok}
    if failed:
        rank = min(failed)
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{failed[rank]}")
    return [outcome[r][1] for r in range(world_size)]
