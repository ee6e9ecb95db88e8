"""GPU-path wiring that a CPU can check: fp16 loss scaling through the optimizer, the DDP overlap
and FP8 settings, device binding, the fused weight-gradient switch, the launcher environment and
the GPU check's no-GPU exit. (What needs a GPU is in benchmarks/gpu_check.py.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import training_cases as tc
from clinmega.config import ConfigError
from clinmega.runtime.distributed import bind_device

ROOT = Path(__file__).resolve().parents[1]


def _first_step(tmp: Path, dtype: str, scale: float | None = None) -> dict:
    from clinmega.runtime import initialize
    from clinmega.training.loop import build_trainer

    cfg = tc.experiment(tc.CPT_RECIPE, tmp / dtype, f"precision.dtype={dtype}", "train.steps=2",
                        "train.warmup_steps=0", "logging.tensorboard=false")
    initialize(cfg.parallel, cfg.runtime)
    trainer = build_trainer(cfg)
    if scale is not None:  # the dynamic scaler starts at 2**32 (megatron's default)
        for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
            opt.grad_scaler._scale = torch.tensor([scale])
    before = [p.detach().float().clone() for p in trainer.model[0].parameters()]
    metrics = trainer.step(0)
    moved = sum((p.detach().float() - b).abs().sum().item()
                for p, b in zip(trainer.model[0].parameters(), before))
    return dict(metrics, moved=moved, scale_func=trainer.model[0].config.grad_scale_func)


def test_fp16_scales_the_loss_and_moves_the_weights(tmp_path):
    """CPU fp16 matmuls are slow but exact enough for a tiny model, so this runs the real thing:
    the schedule multiplies the loss by the optimizer's scale (grad_scale_func), the optimizer
    divides it back out. At 2**32 the first step overflows and is skipped (proof the loss was
    scaled); at 1024 the unscaled gradient norm equals fp32's. Without grad_scale_func the norm
    would be fp32's / 1024."""
    fp32 = _first_step(tmp_path, "fp32")
    big = _first_step(tmp_path / "big", "fp16")
    assert big["skipped"] == 1 and big["moved"] == 0
    fp16 = _first_step(tmp_path / "small", "fp16", scale=1024.0)
    assert fp16["scale_func"] is not None and fp16["skipped"] == 0
    assert fp16["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=0.05)
    assert fp16["moved"] > 0.25 * fp32["moved"]


def _ddp(cuda: bool, *overrides: str):
    from clinmega.training.loop import _ddp_config

    return _ddp_config(tc.experiment(tc.CPT_RECIPE, Path("/tmp/unused"), *overrides), cuda=cuda)


def test_overlap_defaults_on_cuda_with_distributed_optimizer():
    on = _ddp(True)
    assert on.overlap_grad_reduce and on.overlap_param_gather and on.use_distributed_optimizer
    off = _ddp(False)
    assert not off.overlap_grad_reduce and not off.overlap_param_gather
    plain = _ddp(True, "train.use_distributed_optimizer=false")
    assert not plain.overlap_grad_reduce and not plain.overlap_param_gather
    chosen = _ddp(True, "train.overlap_param_gather=false")
    assert chosen.overlap_grad_reduce and not chosen.overlap_param_gather
    assert _ddp(False, "train.overlap_grad_reduce=true").overlap_grad_reduce


def test_fp8_param_gather_wires_ddp_and_optimizer_or_is_refused():
    from clinmega.training.optimizer import optimizer_config

    cfg = tc.experiment(tc.CPT_RECIPE, Path("/tmp/unused"), "precision.fp8=hybrid",
                        "precision.fp8_recipe=tensorwise", "precision.fp8_param_gather=true")
    assert _ddp(True, "precision.fp8=hybrid", "precision.fp8_param_gather=true").fp8_param_gather
    assert optimizer_config(cfg.train, cfg.precision).fp8_recipe == "tensorwise"
    with pytest.raises(ConfigError, match="precision.fp8_param_gather.*use_distributed_optimizer"):
        tc.experiment(tc.CPT_RECIPE, Path("/tmp/unused"), "precision.fp8=hybrid",
                      "precision.fp8_param_gather=true", "train.use_distributed_optimizer=false")
    with pytest.raises(ConfigError, match="precision.fp8_param_gather"):
        tc.experiment(tc.CPT_RECIPE, Path("/tmp/unused"), "precision.fp8_param_gather=true")


@pytest.mark.parametrize("local_rank, count, index", [
    (0, 8, 0), (5, 8, 5), (3, 1, 0), (7, 1, 0), (5, 4, 1), (6, 2, 0)])
def test_device_binding_wraps_local_rank(local_rank, count, index):
    assert bind_device(local_rank, count) == index


def test_device_binding_without_gpus_is_a_clear_error():
    with pytest.raises(ConfigError, match="sees no GPU"):
        bind_device(0, 0)


def test_gradient_accumulation_fusion_follows_the_kernel(monkeypatch):
    from megatron.core.tensor_parallel import layers

    from clinmega.models import builder

    for available in (False, True):
        builder.fused_wgrad_available.cache_clear()
        monkeypatch.setattr(layers, "_grad_accum_fusion_available", available)
        assert builder.fused_wgrad_available() is available
    builder.fused_wgrad_available.cache_clear()


def test_gpu_check_exits_at_once_without_cuda(tmp_path):
    out = tmp_path / "verdict.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stderr
    assert "no GPU" in proc.stderr
    verdict = json.loads(out.read_text())
    assert verdict["ok"] is False and verdict["stages"] == {} and "no GPU" in verdict["error"]


def test_launchers_set_cuda_device_max_connections_and_require_the_clinmega_image(tmp_path):
    from clinmega.launch import nemo_run as cm

    for name in ("slurm/clinmega.sbatch", "slurm/torchrun_node.sh", "Dockerfile"):
        assert "CUDA_DEVICE_MAX_CONNECTIONS" in (ROOT / "containers" / name).read_text(), name
    for executor in (cm.local_executor(), cm.local_executor(nproc_per_node=2),
                     cm.slurm_executor(account="a", partition="p", container_image="c.sqsh")):
        assert executor.env_vars["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    with pytest.raises(ValueError, match="containers/Dockerfile"):
        cm.slurm_executor(account="a", partition="p", container_image="")
    proc = subprocess.run(["bash", str(ROOT / "containers/slurm/clinmega.sbatch")], cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "RECIPE": "r.yaml"}, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode != 0 and "containers/Dockerfile" in proc.stderr


def test_gpu_check_has_every_stage_the_issue_lists():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert list(module.STAGES) == ["te_vs_local", "train_resume_te", "fp8_delayed", "fp8_tensorwise",
                                   "fp8_param_gather", "mixtral_grouped_fp8", "fp16",
                                   "eval_megatron_vs_hf"]
    assert module.no_gpu_reason() is not None  # this machine has no CUDA
