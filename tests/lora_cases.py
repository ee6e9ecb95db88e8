"""Multi-rank LoRA cases for test_lora.py: one table of named case functions, all run by one spawned
2-rank gloo group (tests/case_table.py).

**Equivalence.** The reference is the single-process LoRA model (TP1/PP1/EP1 with the full batch
on both ranks, so its reduced gradients are the single-process ones), on a base + adapters whose
``B`` is random (with ``B = 0`` the ``A`` gradients would be zero). Each other layout loads the
same full weights (base + adapters, resharded by megatron-core from one dist checkpoint), runs
one forward/backward through megatron-core's schedule + DDP and saves its *adapter gradients* as
an adapter dist checkpoint; the reference layout loads them back (megatron-core gathers the shards)
and compares tensor by tensor. Mixtral EP2 runs with the aux loss on: both ranks get the full batch
(DP2 over the dense weights, the experts split over EP), so the router sees the same tokens as in
the single process.

**Training.** The tiny SFT recipe (packed, NEFTune) with ``train.peft=lora`` on DP2 with the
distributed optimizer, from a base checkpoint the group writes first: base tensors before/after,
the optimizer state and grad-buffer sizes, the logits at step 0 against the base model and after
training against the merged weights.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallelConfig

import parallel_cases as pc
import training_cases as tc
from case_table import CaseTable
from clinmega.config import ParallelConfig
from clinmega.models import build_model, get_preset
from clinmega.models.dist_ckpt import load_model_weights, save_model_weights, unwrap
from clinmega.models.lora import LoRAConfig, delta
from clinmega.models.lora_layers import (
    adapter_parameters,
    apply_lora,
    lora_modules,
    lora_transformer_overrides,
)
from clinmega.runtime import init_model_parallel
from clinmega.training.step import forward_backward, wrap_ddp

TABLE = CaseTable(__name__)
LORA = LoRAConfig(rank=4, alpha=8.0)
SEED = 7


def lora_model(model_cfg, parallel: ParallelConfig, **overrides) -> list:
    init_model_parallel(parallel, pc.RUNTIME)
    chunks = build_model(model_cfg, parallel, pc.PRECISION, pc.RUNTIME,
                         **{**overrides, **lora_transformer_overrides(model_cfg.is_moe)})
    apply_lora(chunks, LORA, SEED)
    return chunks


@lru_cache(maxsize=None)
def lora_weights(root: Path, model_name: str) -> Path:
    """Single-process base + adapters (``B`` random) as one full dist checkpoint."""
    weights = root / "lora_weights" / model_name
    chunks = lora_model(get_preset(model_name), ParallelConfig())
    gen = torch.Generator().manual_seed(11)
    for name, param in adapter_parameters(chunks):
        if name.endswith("lora_b.weight"):
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    save_model_weights(chunks, weights)
    return weights


def run_lora_layout(model_name: str, parallel: ParallelConfig, weights: Path, replicate: bool,
                    grads_dir: Path, **overrides) -> tuple[float, dict]:
    """One forward/backward of the LoRA model at ``parallel``; its adapter gradients are saved to
    ``grads_dir`` (as adapter weights); returns the loss and what DDP allocated."""
    model_cfg = get_preset(model_name)
    chunks = lora_model(model_cfg, parallel, **overrides)
    load_model_weights(chunks, weights)
    ddp = wrap_ddp(chunks, DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    loss = forward_backward(ddp, pc.microbatches(pc.make_batch(model_cfg.vocab_size), replicate))
    frozen_with_grad = [n for c in ddp for n, p in c.module.named_parameters()
                        if not p.requires_grad and hasattr(p, "main_grad")]
    for _, param in adapter_parameters(chunks):
        param.data.copy_(param.main_grad)
    save_model_weights(chunks, grads_dir, part="adapters")
    buffers = sum(b.grad_data.numel() for c in ddp for b in c.buffers + c.expert_parallel_buffers)
    adapters = sum(p.numel() for _, p in adapter_parameters(chunks))
    return loss, dict(frozen_with_grad=frozen_with_grad, grad_buffer_numel=buffers,
                      adapter_numel=adapters)


def adapter_grads(model_name: str, grads_dir: Path, **overrides) -> dict[str, torch.Tensor]:
    chunks = lora_model(get_preset(model_name), ParallelConfig(), **overrides)
    load_model_weights(chunks, grads_dir, part="adapters")
    return {n: p.detach().clone() for n, p in adapter_parameters(chunks)}


@lru_cache(maxsize=None)
def reference(root: Path, model_name: str) -> tuple[float, dict]:
    grads = root / "reference_grads" / model_name
    loss, _ = run_lora_layout(model_name, ParallelConfig(), lora_weights(root, model_name), True,
                              grads)
    return loss, adapter_grads(model_name, grads)


def layout_case(tmp: Path, model_name: str, parallel: ParallelConfig, replicate=False) -> dict:
    ref_loss, ref = reference(tmp.parent, model_name)
    loss, ddp = run_lora_layout(model_name, parallel, lora_weights(tmp.parent, model_name),
                                replicate, tmp / "grads")
    return dict(loss=loss, ref_loss=ref_loss, **ddp,
                **pc.compare(adapter_grads(model_name, tmp / "grads"), ref))


@TABLE.case
def mistral_tp2(tmp: Path) -> dict:
    return layout_case(tmp, pc.MISTRAL, ParallelConfig(tensor_parallel=2))


@TABLE.case
def mistral_tp2_sp(tmp: Path) -> dict:
    return layout_case(tmp, pc.MISTRAL, ParallelConfig(tensor_parallel=2, sequence_parallel=True))


@TABLE.case
def mistral_pp2(tmp: Path) -> dict:
    return layout_case(tmp, pc.MISTRAL, ParallelConfig(pipeline_parallel=2))


@TABLE.case
def mistral_pp2_vpp2(tmp: Path) -> dict:
    return layout_case(tmp, pc.MISTRAL, ParallelConfig(pipeline_parallel=2,
                                                       virtual_pipeline_parallel=2))


@TABLE.case
def mixtral_ep2(tmp: Path) -> dict:
    """EP2 with the aux loss on (both ranks see the full batch)."""
    return layout_case(tmp, pc.MIXTRAL, ParallelConfig(expert_parallel=2), replicate=True)


# --- LoRA SFT training (DP2, distributed optimizer, packed + NEFTune) ---------------------------
def base_checkpoint(tmp: Path) -> Path:
    """A described full checkpoint of the tiny SFT model (one step of full SFT)."""
    tc.run(tc.SFT_RECIPE, tmp / "base", "train.steps=1", "train.warmup_steps=0",
           "logging.tensorboard=false")
    return tmp / "base"


def eval_logits(trainer) -> torch.Tensor:
    """Logits of the first chunk on a fixed batch, eval mode."""
    model = unwrap(trainer.model[0])
    model.eval()
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 64, (2, 16), generator=gen)
    with torch.no_grad():
        out = model(tokens, torch.arange(16).repeat(2, 1), None)
    model.train()
    return out.detach().clone()


@TABLE.case
def sft_lora_dp2(tmp: Path) -> dict:
    from clinmega.training.loop import build_trainer
    from clinmega.runtime import initialize

    base = base_checkpoint(tmp)
    cfg = tc.experiment(tc.SFT_RECIPE, tmp / "lora", "train.peft=lora", "lora.rank=4",
                        f"checkpoint.load_weights={base}", "train.steps=4", "train.warmup_steps=1",
                        "train.use_distributed_optimizer=true", "logging.tensorboard=false")
    # the base model alone, from the same checkpoint
    initialize(cfg.parallel, cfg.runtime)
    plain = build_model(cfg.model, cfg.parallel, cfg.precision, cfg.runtime)
    load_model_weights(plain, base / "checkpoints" / "iter_0000001")
    plain[0].eval()
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 64, (2, 16), generator=gen)
    with torch.no_grad():
        base_logits = plain[0](tokens, torch.arange(16).repeat(2, 1), None).detach().clone()
    del plain

    trainer = build_trainer(cfg)
    model = unwrap(trainer.model[0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step0 = eval_logits(trainer)
    clean, noisy = [], []  # the frozen embedding's output before / after NEFTune's hook
    model.embedding.register_forward_hook(lambda m, i, out: clean.append(out.detach().clone()),
                                          prepend=True)
    model.embedding.register_forward_hook(lambda m, i, out: noisy.append(out.detach().clone()))
    losses = [trainer.step(s)["loss"] for s in range(4)]
    noise = max((n - c).abs().max().item() for c, n in zip(clean, noisy))
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora_logits = eval_logits(trainer)
    # merged: W + scale * B @ A in a copy of the weights, adapters' B zeroed
    with torch.no_grad():
        for _, module in lora_modules([model]):
            module.weight += delta(module.lora_a.weight, module.lora_b.weight, module.lora_scale)
            module.lora_b.weight.zero_()
    merged_logits = eval_logits(trainer)
    optimizers = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    local = sum(t.numel() for opt in optimizers for state in opt.optimizer.state.values()
                for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    opt_numel = torch.tensor([local])
    dist.all_reduce(opt_numel)  # the distributed optimizer's shards over both DP ranks
    ddp = trainer.model[0]
    buffers = sum(b.grad_data.numel() for b in ddp.buffers + ddp.expert_parallel_buffers)
    adapters = sum(p.numel() for _, p in adapter_parameters(trainer.model))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    trainer.checkpointer.close()
    dist.barrier()
    return dict(base_logits=base_logits, step0=step0, lora_logits=lora_logits,
                merged_logits=merged_logits, losses=losses, neftune_noise=noise,
                neftune_alpha=cfg.train.neftune_alpha, hidden=cfg.model.hidden_size,
                changed=sorted(n for n in before if not torch.equal(before[n], after[n])),
                trainable=trainable, opt_numel=int(opt_numel), grad_buffer_numel=buffers,
                adapter_numel=adapters, dp=trainer.cfg.parallel.data_parallel_size(2))
