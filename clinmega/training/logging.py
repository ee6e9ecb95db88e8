"""Training metrics: a JSONL log (``metrics.jsonl``, one record per logged step), TensorBoard
scalars, and a rich progress bar with loss, LR and tokens/s; on GPU also TFLOPS per GPU and MFU
from :func:`clinmega.models.flops.training_flops_per_token` (GQA, SwiGLU, top-k experts, causal
attention, sliding window).

Only global rank 0 writes. ``plot.py`` reads the JSONL.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from clinmega.training.metrics_file import METRICS_FILE, read_metrics  # noqa: F401  (read_metrics re-exported)


# Dense peak TFLOPS per GPU (no sparsity): BF16 and FP8 (REFERENCE.md §6; vendor data sheets).
PEAK_TFLOPS = {"H100": (989.0, 1979.0), "H200": (989.0, 1979.0), "H20": (148.0, 296.0),
               "B200": (2250.0, 4500.0), "A100": (312.0, None)}


def peak_tflops(fp8: bool, configured: float | None = None) -> float | None:
    """The GPU's dense peak TFLOPS for the compute dtype, or None (CPU / unknown GPU)."""
    if configured:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, (bf16, f8) in PEAK_TFLOPS.items():
        if key in name:
            return (f8 or bf16) if fp8 else bf16
    return None


class MetricsLogger:
    """Writes step records; ``log(step, **metrics)`` adds throughput from the step time."""

    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int, enabled: bool,
                 tokens_per_step: int, flops_per_step: float, world_size: int,
                 peak: float | None, tensorboard: bool = True, progress: bool = True):
        self.enabled = enabled
        self.tokens_per_step, self.flops_per_step = tokens_per_step, flops_per_step
        self.world_size, self.peak = world_size, peak
        self._writer = self._progress = self._jsonl = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / METRICS_FILE, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(run_dir / "tensorboard"))
        if progress and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("[bold]train"), BarColumn(),
                                      TextColumn("{task.completed}/{task.total}"),
                                      TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step,
                                                 info="")
            self._progress.start()

    def throughput(self, step_time: float) -> dict[str, float]:
        out = {"step_time_s": step_time, "tokens_per_s": self.tokens_per_step / step_time}
        if torch.cuda.is_available():
            tflops = self.flops_per_step / step_time / self.world_size / 1e12
            out["tflops_per_gpu"] = tflops
            if self.peak:
                out["mfu"] = tflops / self.peak
        return out

    def log(self, step: int, **metrics: Any) -> dict[str, Any]:
        record = {"step": step, **{k: v for k, v in metrics.items() if v is not None}}
        if not self.enabled:
            return record
        self._jsonl.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    # eval/<benchmark>/acc keeps its own section next to train/loss
                    self._writer.add_scalar(key if "/" in key else f"train/{key}", value, step)
        if self._progress is not None:
            info = f"loss {record.get('loss', float('nan')):.4f} lr {record.get('lr', 0):.2e}"
            if "tokens_per_s" in record:
                info += f" {record['tokens_per_s']:.0f} tok/s"
            if "tflops_per_gpu" in record:
                info += f" {record['tflops_per_gpu']:.0f} TFLOPS/GPU"
            self._progress.update(self._task, completed=step, info=info)
        return record

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()


class StepTimer:
    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.elapsed = time.perf_counter() - self.start
