"""Per-step time of ``clinmega train``'s step against a bare megatron-core loop, and NEFTune on/off.

Both loops run in this one process on the same tiny model shape and batch geometry:

* clinmega: ``Trainer.step`` (sampling the global batch, microbatches through
  ``get_forward_backward_func``, NaN check, MoE/metrics bookkeeping, optimizer + LR schedule);
* bare: megatron-core only — the same GPTModel chunks in megatron DDP, ``get_megatron_optimizer``,
  a pre-built list of microbatches, a 10-line forward step, ``optimizer.step()``.

First both loops run 3 steps from the same weights on the same batches and must give the same
losses (else the benchmark stops). Steps alternate between the two (A B A B ...) so that machine noise hits both alike; the
figure is the ratio of medians. NEFTune on/off toggles the noise on the same trainer.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_train_step.py [recipe] [key=value ...]
"""

from __future__ import annotations

import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def bare_megatron(cfg, microbatches, weights: dict | None = None):
    """A minimal megatron-core training step over fixed microbatches (or the ones it is given),
    from ``weights`` (a state dict) when given; returns step(microbatches=None, lr=None) -> loss."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from clinmega.models import build_model
    from clinmega.training.step import set_aux_loss_scale

    chunk = build_model(cfg.model, cfg.parallel, cfg.precision, cfg.runtime,
                        calculate_per_token_loss=True)[0]
    if weights is not None:
        chunk.load_state_dict(weights)
    chunk.config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(chunk.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True), chunk)
    t = cfg.train
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=t.lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad,
        use_distributed_optimizer=True), [ddp])

    def loss_func(loss_mask, output):
        mask = loss_mask.view(-1).float()
        loss = torch.sum(output.view(-1).float() * mask)
        return loss, mask.sum().to(torch.int), {"lm loss": loss.detach()}

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        return model(b["tokens"], b["position_ids"], None, labels=b["labels"]), partial(
            loss_func, b["loss_mask"])

    def step(mbs=None, lr=None):
        mbs = microbatches if mbs is None else mbs
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        set_aux_loss_scale([ddp], mbs)  # MoE: the aux loss weighted as clinmega's step does
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(mbs), model=[ddp],
            num_microbatches=len(mbs), seq_length=t.seq_length,
            micro_batch_size=t.micro_batch_size, forward_only=False)
        optimizer.step()
        return float(sum(x["lm loss"] for x in losses) / sum(mb["loss_mask"].sum() for mb in mbs))

    return step


def check_same_losses(cfg, steps: int = 3, tol: float = 1e-5) -> None:
    """Both loops, from the same weights on the same global batches (the bare one at the
    trainer's learning rate of each step), give the same losses; raises otherwise."""
    from clinmega.models.dist_ckpt import unwrap
    from clinmega.training.loop import build_trainer
    from clinmega.training.optimizer import current_lr

    trainer = build_trainer(cfg)
    trainer.neftune = None
    bare = bare_megatron(cfg, None, unwrap(trainer.model[0]).state_dict())
    for i in range(steps):
        lr = current_lr(trainer.optimizer)
        ours, theirs = trainer.step(i)["loss"], bare(trainer.sampler.microbatches(i, 0, 1), lr)
        if abs(ours - theirs) > tol:
            raise AssertionError(f"step {i + 1}: clinmega loss {ours} != bare megatron-core {theirs}")
    print(f"losses equal over {steps} steps (|diff| <= {tol})")


def alternate(a, b, steps: int, warmup: int = 3) -> tuple[float, float, float]:
    """Median seconds per call of ``a(i)`` and ``b(i)``, interleaved, and the median of the
    per-pair ratios a/b (robust to slow phases of a shared machine)."""
    times_a, times_b = [], []
    for i in range(warmup + steps):
        for fn, times in ((a, times_a), (b, times_b)) if i % 2 else ((b, times_b), (a, times_a)):
            start = time.perf_counter()
            fn(i)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    ratios = [x / y for x, y in zip(times_a, times_b)]
    return statistics.median(times_a), statistics.median(times_b), statistics.median(ratios)


def neftune_cost(trainer, neftune, repeats: int = 50) -> float:
    """Seconds per step spent in NEFTune alone: contexts + noise for every microbatch."""
    mbs = trainer.sampler.microbatches(0, 0, 1)
    h = trainer.cfg.model.hidden_size
    out = torch.zeros(mbs[0]["tokens"].shape[1], mbs[0]["tokens"].shape[0], h)
    start = time.perf_counter()
    for i in range(repeats):
        for j, mb in enumerate(mbs):
            neftune.noise(neftune.context(mb, i, 0, j), out, False)
    return (time.perf_counter() - start) / repeats


def main(argv: list[str]) -> int:
    from clinmega.runtime import initialize, shutdown
    from clinmega.training.config import load_experiment
    from clinmega.training.loop import build_trainer
    from clinmega.training.neftune import NEFTune

    recipe = argv[0] if argv and argv[0].endswith(".yaml") else str(ROOT / "recipes/tiny_cpu_cpt.yaml")
    overrides = [a for a in argv if "=" in a]
    steps = 60
    cfg = load_experiment([recipe], ["run_dir=/tmp/clinmega_bench", "checkpoint.resume=false",
                                     f"train.steps={10 * steps}", "train.eval_interval=0",
                                     "train.neftune_alpha=5.0", *overrides])
    initialize(cfg.parallel, cfg.runtime)
    check_same_losses(cfg)
    trainer = build_trainer(cfg)
    neftune = trainer.neftune
    bare = bare_megatron(cfg, trainer.sampler.microbatches(0, 0, 1))

    trainer.neftune = None
    t_clin, t_bare, ratio = alternate(trainer.step, lambda i: bare(), steps)
    print(f"step time  clinmega {t_clin * 1e3:8.2f} ms   bare megatron-core {t_bare * 1e3:8.2f} ms"
          f"   ratio of medians {t_clin / t_bare:.4f}   median pair ratio {ratio:.4f}")

    def with_neftune(i):
        trainer.neftune = neftune
        trainer.step(i)

    def without(i):
        trainer.neftune = None
        trainer.step(i)

    t_on, t_off, ratio = alternate(with_neftune, without, steps)
    print(f"NEFTune    on {t_on * 1e3:8.2f} ms   off {t_off * 1e3:8.2f} ms"
          f"   ratio of medians {t_on / t_off:.4f}   median pair ratio {ratio:.4f}")
    assert isinstance(neftune, NEFTune)
    cost = neftune_cost(trainer, neftune)
    print(f"NEFTune alone (contexts + noise, all microbatches): {cost * 1e3:.3f} ms/step = "
          f"{cost / t_off * 100:.2f}% of the step")
    shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
