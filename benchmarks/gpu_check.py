"""One command that proves clinmega's GPU path on one CUDA GPU (about 3-8 minutes):

    python benchmarks/gpu_check.py [--out gpu_check.json] [--workdir DIR] [--only STAGE,...]

Each stage runs in its own process (a CUDA fault in one cannot take the others down), under a
time limit; the verdict file gets one entry per stage (``ok``, numbers, or the error) as soon as it
finishes, and the run goes on after a failed stage. Exit status: 0 all stages passed, 1 some
failed, 2 no GPU (at once, before anything is built).

Stages (tiny models, Transformer Engine layer specs unless named otherwise):

* ``te_vs_local`` – the same imported weights under the TE and the local spec: unpacked logits
  close; every packed sub-sequence through the THD route equals that sample run alone.
* ``train_resume_te`` – packed training (bf16) for 6 steps, and 3 steps + save + resume to 6:
  the resumed losses equal the uninterrupted ones.
* ``fp8_delayed`` / ``fp8_tensorwise`` – losses finite and close to bf16's.
* ``fp8_param_gather`` – FP8 weights (distributed optimizer) change after optimizer steps.
* ``mixtral_grouped_fp8`` – tiny Mixtral, grouped GEMM + FP8, 3 steps, finite losses.
* ``fp16`` – fp16 with the dynamic loss scaler: steps stop being skipped and the weights move.
* ``eval_megatron_vs_hf`` – the Megatron eval backend on CUDA picks the same multiple-choice answers
  as the HF backend on the exported model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny_cpu_cpt.yaml"
STAGE_TIMEOUT_S = 150
TOTAL_BUDGET_S = 480
TE = "runtime.transformer_impl=transformer_engine"
QUIET = ["logging.tensorboard=false", "train.eval_interval=0", "train.warmup_steps=0"]
HF_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048,
               rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=8, tie_word_embeddings=False)


# --- helpers (run inside a stage process) -------------------------------------------------------
def _experiment(run_dir: Path, *overrides: str):
    from clinmega.training.config import load_experiment

    return load_experiment([RECIPE], [f"run_dir={run_dir}", *QUIET, *overrides])


def _losses(run_dir: Path) -> dict[int, float]:
    from clinmega.training.logging import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def _train(run_dir: Path, *overrides: str) -> dict[int, float]:
    from clinmega.training.loop import train

    train(_experiment(run_dir, *overrides))
    return _losses(run_dir)


def _finite(losses: dict[int, float]) -> bool:
    return bool(losses) and all(math.isfinite(v) for v in losses.values())


def _hf_model(work: Path) -> Path:
    """A tiny random HF Mistral (sliding window 8) with the real tokenizer, and its TE-keyed import."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from clinmega.conversion import import_hf
    from clinmega.demo.hf_checkpoint import write_tokenizer

    hf = work / "hf"
    if not (work / "ckpt").is_dir():
        torch.manual_seed(0)
        model = MistralForCausalLM(MistralConfig(**HF_TINY))
        with torch.no_grad():
            model.lm_head.weight.mul_(20.0)  # options really differ in the eval stage
        model.save_pretrained(hf)
        write_tokenizer(hf)
        import_hf(hf, work / "ckpt", transformer_impl="transformer_engine", progress=False)
    return hf


def _model(cfg, impl: str, dtype: str, ckpt: Path):
    from clinmega.config import ParallelConfig, PrecisionConfig, RuntimeConfig
    from clinmega.models import build_model
    from clinmega.models.dist_ckpt import load_model_weights

    (model,) = build_model(cfg, ParallelConfig(), PrecisionConfig(dtype),
                           RuntimeConfig(transformer_impl=impl))
    load_model_weights([model], ckpt)
    return model.eval()


# --- stages ------------------------------------------------------------------------------------
def stage_te_vs_local(work: Path) -> dict:
    import torch

    from clinmega.config import ParallelConfig, RuntimeConfig
    from clinmega.conversion.checkpoint_info import hf_model_config
    from clinmega.runtime import initialize
    from clinmega.training.data import SyntheticSource, collate
    from clinmega.training.step import _packed_to, model_inputs

    hf = _hf_model(work)
    cfg = hf_model_config(hf)
    initialize(ParallelConfig(), RuntimeConfig())
    te, local = (_model(cfg, impl, "bf16", work / "ckpt") for impl in ("transformer_engine", "local"))
    toks = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda")
    pos = torch.arange(64, device="cuda").repeat(2, 1)
    with torch.no_grad():
        a, b = te(toks, pos, None).float(), local(toks, pos, None).float()
    unpacked = float((a - b).abs().max() / a.std())
    src = SyntheticSource(4, 64, cfg.vocab_size, seed=3, packed=True)
    batch = collate([src[i] for i in range(2)])
    thd, mask = model_inputs(batch, te)
    assert mask is None and thd["packed_seq_params"] is not None
    params = _packed_to(thd["packed_seq_params"], torch.device("cuda"))
    index = thd["thd_index"].cuda()
    with torch.no_grad():
        packed = te(thd["tokens"].cuda(), thd["position_ids"].cuda(), None,
                    packed_seq_params=params).float()[0]
        worst, subseqs = 0.0, 0
        for row, cu in enumerate(batch["cu_seqlens"]):
            for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
                alone = te(batch["tokens"][row:row + 1, s:e].cuda(),
                           torch.arange(e - s, device="cuda")[None], None).float()[0]
                mine = packed[(index >= row * 64 + s) & (index < row * 64 + e)]
                worst = max(worst, float((mine - alone).abs().max() / alone.std()))
                subseqs += 1
    return dict(ok=unpacked < 0.05 and worst < 0.05, unpacked_rel_diff=unpacked,
                packed_vs_alone_rel_diff=worst, subsequences=subseqs)


def stage_train_resume_te(work: Path) -> dict:
    """The same config twice in one folder: the first run is stopped after step 3 the way SIGTERM
    stops it (save, exit), the second resumes from that checkpoint to step 6."""
    from clinmega.training import loop

    common = [TE, "precision.dtype=bf16", "data.synthetic_packed=true", "train.steps=6",
              "train.decay_steps=6", "train.save_interval=0"]
    full = _train(work / "full", *common)
    real, calls = loop.TerminationFlag.should_stop, {"n": 0}

    def stop_after_3(self):
        calls["n"] += 1
        return calls["n"] == 3 or real(self)

    loop.TerminationFlag.should_stop = stop_after_3
    try:
        _train(work / "split", *common)
    finally:
        loop.TerminationFlag.should_stop = real
    split = _train(work / "split", *common)
    diff = max(abs(full[s] - split[s]) for s in (4, 5, 6))
    return dict(ok=_finite(full) and diff <= 1e-3 * abs(full[6]) and full[6] < full[1],
                full=full, resumed=split, max_diff_after_resume=diff)


def _fp8(work: Path, recipe: str) -> dict:
    steps = ["train.steps=10", "train.decay_steps=10"]
    bf16 = _train(work / "bf16", TE, "precision.dtype=bf16", *steps)
    fp8 = _train(work / recipe, TE, "precision.dtype=bf16", "precision.fp8=hybrid",
                 f"precision.fp8_recipe={recipe}", *steps)
    rel = abs(fp8[10] - bf16[10]) / abs(bf16[10])
    return dict(ok=_finite(fp8) and rel < 0.1, bf16=bf16, fp8=fp8, final_rel_diff=rel)


def stage_fp8_delayed(work: Path) -> dict:
    return _fp8(work, "delayed")


def stage_fp8_tensorwise(work: Path) -> dict:
    return _fp8(work, "tensorwise")


def _weights_move(work: Path, *overrides: str, steps: int) -> dict:
    import torch

    from clinmega.models.dist_ckpt import unwrap
    from clinmega.runtime import initialize
    from clinmega.training.loop import build_trainer

    cfg = _experiment(work, TE, f"train.steps={steps}", f"train.decay_steps={steps}", *overrides)
    initialize(cfg.parallel, cfg.runtime)
    trainer = build_trainer(cfg)
    params = list(trainer.model[0].parameters())
    before = [p.detach().float().clone() for p in params]
    metrics = [trainer.step(s) for s in range(steps)]
    moved = sum((p.detach().float() - b).abs().sum().item() for p, b in zip(params, before))
    done = [m for m in metrics if not m.get("skipped")]
    config = unwrap(trainer.model[0]).config
    return dict(moved=moved, config=dict(fp8=config.fp8, fp8_param=config.fp8_param,
                                         moe_grouped_gemm=config.moe_grouped_gemm,
                                         grad_accum_fusion=config.gradient_accumulation_fusion), applied_steps=len(done), losses=[m["loss"] for m in metrics],
                ok=moved > 0 and bool(done) and all(math.isfinite(m["loss"]) for m in metrics),
                param_types=sorted({type(p).__name__ for p in params}), torch=torch.__version__)


def stage_fp8_param_gather(work: Path) -> dict:
    return _weights_move(work, "precision.dtype=bf16", "precision.fp8=hybrid",
                         "precision.fp8_recipe=tensorwise", "precision.fp8_param_gather=true",
                         "train.use_distributed_optimizer=true", steps=3)


def stage_mixtral_grouped_fp8(work: Path) -> dict:
    out = _weights_move(work, "model.preset=tiny-mixtral", "precision.dtype=bf16",
                        "precision.fp8=hybrid", "precision.fp8_recipe=delayed", steps=3)
    out["ok"] = out["ok"] and out["config"]["moe_grouped_gemm"] and out["config"]["fp8"] == "hybrid"
    return out


def stage_fp16(work: Path) -> dict:
    # the dynamic scaler starts at 2**32 and halves on overflow: the first steps are skipped
    return _weights_move(work, "precision.dtype=fp16", steps=40)


def stage_eval_megatron_vs_hf(work: Path) -> dict:
    import torch

    from clinmega.conversion import export_hf
    from clinmega.evaluation.backends.hf import HFBackend
    from clinmega.evaluation.backends.megatron import MegatronBackend

    hf = _hf_model(work)
    export_hf(work / "ckpt", work / "exported", progress=False)
    questions = [(f"Question {i}: which organ filters blood? Answer:", [" kidney", " lung", " heart",
                                                                       " skin"]) for i in range(12)]
    requests = [(q, c) for q, options in questions for c in options]
    mega = MegatronBackend.from_checkpoint(work / "ckpt", model_config=hf, tokenizer=hf,
                                           dtype="bfloat16")
    ref = HFBackend.from_pretrained(work / "exported", dtype="bfloat16", device="cuda")
    a, b = mega.loglikelihood(requests), ref.loglikelihood(requests)
    pick = lambda scores: [max(range(4), key=lambda k: scores[4 * i + k]) for i in range(12)]  # noqa: E731
    same = sum(x == y for x, y in zip(pick(a), pick(b)))
    return dict(ok=same == 12, same_answers=same, of=12, te=torch.cuda.get_device_name())


STAGES = {name[len("stage_"):]: fn for name, fn in globals().items() if name.startswith("stage_")}


# --- driver ------------------------------------------------------------------------------------
def _run_stage(name: str, work: Path, result: Path) -> None:
    start = time.time()
    try:
        out = STAGES[name](work)
    except Exception as err:  # the verdict records it; the driver goes on with the next stage
        out = dict(ok=False, error=f"{type(err).__name__}: {err}",
                   traceback=traceback.format_exc(limit=8))
    out["seconds"] = round(time.time() - start, 1)
    result.write_text(json.dumps(out, default=str))


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the check, or None."""
    try:
        import torch
    except ImportError:
        return "no GPU: torch does not import"
    if not torch.cuda.is_available():
        return "no GPU: torch.cuda.is_available() is False (this check needs one CUDA GPU)"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check.json", help="verdict JSON (written after each stage)")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(STAGES)}")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # internal: one stage
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        _run_stage(args.stage, Path(args.workdir), Path(args.result))
        return 0
    out = Path(args.out)
    verdict: dict = dict(ok=False, stages={}, error=None)
    reason = no_gpu_reason()
    if reason:
        verdict["error"] = reason
        out.write_text(json.dumps(verdict, indent=1))
        print(f"gpu_check: {reason}", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.only.split(",")] if args.only else list(STAGES)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        p.error(f"--only: unknown stage(s) {unknown}; choose from {list(STAGES)}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="clinmega-gpu-check-"))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "CUDA_DEVICE_MAX_CONNECTIONS": "1", "HF_HUB_OFFLINE": "1"}
    deadline = time.time() + TOTAL_BUDGET_S
    for name in names:
        left = deadline - time.time()
        if left < 20:
            verdict["stages"][name] = dict(ok=False, error="skipped: the 8-minute budget is spent")
            continue
        stage_dir, result = work / name, work / f"{name}.json"
        stage_dir.mkdir(parents=True, exist_ok=True)
        if name in ("te_vs_local", "eval_megatron_vs_hf"):
            stage_dir = work / "shared"  # one tiny HF model + import for both
            stage_dir.mkdir(exist_ok=True)
        try:
            proc = subprocess.run([sys.executable, __file__, "--stage", name, "--workdir",
                                   str(stage_dir), "--result", str(result)], env=env,
                                  capture_output=True, text=True, timeout=min(STAGE_TIMEOUT_S, left))
            entry = (json.loads(result.read_text()) if result.is_file() else
                     dict(ok=False, error=f"exit {proc.returncode}", stderr=proc.stderr[-3000:]))
        except subprocess.TimeoutExpired:
            entry = dict(ok=False, error=f"timeout after {min(STAGE_TIMEOUT_S, left):.0f} s")
        verdict["stages"][name] = entry
        verdict["ok"] = all(s.get("ok") for s in verdict["stages"].values())
        out.write_text(json.dumps(verdict, indent=1, default=str))
        print(f"gpu_check: {name}: {'ok' if entry.get('ok') else 'FAILED'} "
              f"({entry.get('seconds', '?')} s) {entry.get('error') or ''}", flush=True)
    verdict["ok"] = all(s.get("ok") for s in verdict["stages"].values())
    out.write_text(json.dumps(verdict, indent=1, default=str))
    return 0 if verdict["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
