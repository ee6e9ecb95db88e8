"""LoRA vs full SFT on the tiny model (CPU): peak memory and step time, printed as ratios.

One invocation: a base checkpoint (one full SFT step), then full SFT and LoRA SFT from it, each in
a fresh spawned process (so one variant's allocations do not hide the other's) running the same
``Trainer.step`` on the same recipe (tiny_cpu_sft_neftune: packed, NEFTune). Per variant:

* training state: bytes of the trainable parameters, their gradient buffers and optimizer state
  (what LoRA removes for the frozen weights; the frozen weights themselves are in both);
* peak RSS growth: ``ru_maxrss`` after the timed steps minus the RSS before the trainer is built
  (imports excluded);
* step time: median over the timed steps (after warm-up steps).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_lora.py [--steps N] [key=value ...]

After the table: the planner's per-GPU memory of full SFT vs LoRA for the Mistral-7B and
Mixtral-8x7B LoRA SFT recipes on one 8 x 80 GB node (``clinmega.launch.planner.lora_report``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
RECIPE = RECIPES / "tiny_cpu_sft_neftune.yaml"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def variant(run_dir: str, overrides: list[str], warmup: int, steps: int, save: bool) -> dict:
    """One variant in this (spawned) process: build the trainer, run warm-up + timed steps (and
    save a checkpoint after them when ``save``)."""
    import torch

    from clinmega.runtime import initialize
    from clinmega.training.config import load_experiment
    from clinmega.training.loop import build_trainer

    cfg = load_experiment([RECIPE], [f"run_dir={run_dir}", "logging.tensorboard=false",
                                     "checkpoint.resume=false", *overrides])
    initialize(cfg.parallel, cfg.runtime)
    rss0 = _rss_bytes()
    trainer = build_trainer(cfg)
    times, losses = [], []
    for step in range(warmup + steps):
        start = time.perf_counter()
        losses.append(trainer.step(step)["loss"])
        if step >= warmup:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if save:
        trainer.state.step = warmup + steps
        trainer.checkpointer.save(trainer.state.step, trainer.model, trainer.optimizer,
                                  trainer.scheduler, trainer.state)
    params = [p for c in trainer.model for p in c.module.parameters()]
    trainable = [p for p in params if p.requires_grad]
    grads = [b.grad_data for c in trainer.model for b in c.buffers + c.expert_parallel_buffers]
    optimizers = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    state = [t for opt in optimizers for s in opt.optimizer.state.values() for t in s.values()
             if torch.is_tensor(t)]
    trainer.checkpointer.close()
    return dict(params=sum(p.numel() for p in params), trainable=sum(p.numel() for p in trainable),
                training_state_bytes=_tensor_bytes(trainable) + _tensor_bytes(grads)
                + _tensor_bytes(state),
                weights_bytes=_tensor_bytes(params), peak_rss_growth=peak - rss0,
                step_s=statistics.median(times), losses=losses)


def run_variant(run_dir: Path, overrides: list[str], warmup: int, steps: int,
                save: bool = False) -> dict:
    from clinmega.runtime.local_group import run_local_group

    [out] = run_local_group(variant, 1, (str(run_dir), overrides, warmup, steps, save))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="recipe overrides (key=value) for both runs")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        tmp = Path(tmp)
        run_variant(tmp / "base", ["train.steps=1", "train.warmup_steps=0", *args.overrides], 0, 1,
                    save=True)
        common = [f"checkpoint.load_weights={tmp / 'base'}", "train.save_interval=0",
                  f"train.steps={args.warmup + args.steps}", "train.warmup_steps=1",
                  *args.overrides]
        full = run_variant(tmp / "full", common, args.warmup, args.steps)
        lora = run_variant(tmp / "lora", [*common, "train.peft=lora"], args.warmup, args.steps)
    mib = 2 ** 20
    rows = [("", "full SFT", "LoRA", "LoRA / full"),
            ("trainable parameters", f"{full['trainable']:,}", f"{lora['trainable']:,}",
             f"{lora['trainable'] / full['trainable']:.4f}"),
            ("training state (params+grads+optim) MiB",
             f"{full['training_state_bytes'] / mib:.1f}", f"{lora['training_state_bytes'] / mib:.1f}",
             f"{lora['training_state_bytes'] / full['training_state_bytes']:.3f}"),
            ("peak RSS growth MiB", f"{full['peak_rss_growth'] / mib:.1f}",
             f"{lora['peak_rss_growth'] / mib:.1f}",
             f"{lora['peak_rss_growth'] / max(full['peak_rss_growth'], 1):.3f}"),
            ("step time s (median)", f"{full['step_s']:.3f}", f"{lora['step_s']:.3f}",
             f"{lora['step_s'] / full['step_s']:.3f}")]
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, width)))
    from clinmega.launch.planner import lora_report

    print("\nplanner estimate (clinmega plan), the LoRA SFT recipes on one 8 x 80 GB node:")
    print(lora_report([RECIPES / "mistral_7b_lora_sft.yaml", RECIPES / "mixtral_8x7b_lora_sft.yaml"]))
    print(json.dumps(dict(full=full, lora=lora)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
