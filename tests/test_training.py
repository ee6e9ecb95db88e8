"""Training stage: convergence, DP/optimizer equivalence, kill-and-resume, SIGTERM, NEFTune,
MoE, NaN policy, FP8 gating, CLI/plot. Multi-rank cases run in one spawned 2-rank gloo group
(tests/training_cases.py); whole-process behaviour (SIGKILL, SIGTERM, torchrun) in subprocesses."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import training_cases as cases
from clinmega.config import ConfigError
from clinmega.runtime.local_group import run_local_group
from clinmega.training.checkpoint import read_latest
from clinmega.training.config import TrainConfig, load_experiment
from clinmega.training.data import SyntheticSource, packed_attention_mask
from clinmega.models.flops import training_flops_per_token as flops_per_token
from clinmega.training.logging import read_metrics
from clinmega.training.neftune import real_segments, token_scales

PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(cases.ROOT), "OMP_NUM_THREADS": "1"}
TORCHRUN = Path(PY).with_name("torchrun")


def cli(run_dir: Path, *overrides: str, recipe: Path = cases.CPT_RECIPE) -> list[str]:
    return [PY, "-m", "clinmega.cli", "train", str(recipe), f"run_dir={run_dir}",
            *cases.CPT_STEPS, *overrides]


def run_ok(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout,
                          cwd=cases.ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process exited early with {proc.returncode}:\n"
                                 f"{proc.stderr.read()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


# --- subprocess runs (single process, DP1) ------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Uninterrupted 20-step DP1 run through the CLI, with async checkpointing."""
    run_dir = tmp_path_factory.mktemp("reference")
    proc = run_ok(cli(run_dir, "checkpoint.async_save=true"))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "done" and summary["latest"] == 20
    return run_dir


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """A run SIGKILLed right after its step-10 checkpoint (it was configured for 1000 steps)."""
    run_dir = tmp_path_factory.mktemp("killed")
    ckpt = run_dir / "checkpoints"
    proc = subprocess.Popen(cli(run_dir, "train.steps=1000"), env=ENV, cwd=cases.ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (ckpt / "latest").is_file() and read_latest(ckpt) == 10, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    return run_dir


def test_cpt_loss_decreases(reference):
    losses = cases.losses(reference)
    assert sorted(losses) == list(range(1, 21))
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[20] < losses[1] - 2.0, losses
    assert sum(losses[s] for s in range(16, 21)) < sum(losses[s] for s in range(1, 6))


def test_kill_and_resume_is_bit_exact(reference, killed):
    assert read_latest(killed / "checkpoints") == 10
    assert not any(p.name.startswith((".iter_0000010.tmp", "iter_0000010.tmp"))
                   for p in (killed / "checkpoints").iterdir())
    run_ok(cli(killed))  # resumes from latest = 10
    ref, resumed = cases.losses(reference), cases.losses(killed)
    for step in range(11, 21):
        assert resumed[step] == ref[step], (step, resumed[step], ref[step])
    assert read_latest(killed / "checkpoints") == 20
    kept = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("iter_"))
    assert kept == ["iter_0000010", "iter_0000020"], kept  # keep_last = 2


def test_torchrun_resume_at_dp2(reference, killed, tmp_path):
    """The DP1 step-10 checkpoint resumes under torchrun with 2 ranks (distributed optimizer
    state resharded from DP1 to DP2); losses follow the uninterrupted DP1 run."""
    import shutil

    run_dir = tmp_path / "dp2_resume"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(killed / "checkpoints" / "iter_0000010",
                    run_dir / "checkpoints" / "iter_0000010")
    (run_dir / "checkpoints" / "latest").write_text("10\n")
    run_ok([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m",
            "clinmega.cli", *cli(run_dir)[3:]])
    ref, got = cases.losses(reference), cases.losses(run_dir)
    assert sorted(got) == list(range(11, 21))
    for step in got:
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])


def test_sigterm_saves_and_exits(tmp_path):
    run_dir = tmp_path / "sigterm"
    proc = subprocess.Popen(cli(run_dir, "train.steps=1000", "train.save_interval=0"), env=ENV,
                            cwd=cases.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "terminated"
    last = max(r["step"] for r in read_metrics(run_dir))
    assert summary["step"] == last and read_latest(run_dir / "checkpoints") == last


def test_plot_writes_png(reference, tmp_path):
    out = tmp_path / "curves.png"
    run_ok([PY, "-m", "clinmega.cli", "plot", str(reference), "-o", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the 2-rank group ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def group(tmp_path_factory) -> dict:
    ranks = run_local_group(cases.all_cases, 2, (str(tmp_path_factory.mktemp("group")),))
    return {"ranks": ranks, **ranks[0]}


@pytest.mark.distributed
@pytest.mark.parametrize("variant", ["dp2_distopt", "dp2_plain"])
def test_dp2_matches_dp1(group, reference, variant):
    ref, got = cases.losses(reference), group[variant]
    assert sorted(got) == list(range(1, 21))
    for step in got:
        assert abs(got[step] - ref[step]) <= 1e-5, (variant, step, got[step], ref[step])


@pytest.mark.distributed
def test_pipeline_with_virtual_stages_matches_dp1(group, reference):
    """PP2 x VPP2 (interleaved 1F1B) from the same initial weights (checkpoint.load_weights)."""
    ref, got = cases.losses(reference), group["pp2_vpp2"]
    assert sorted(got) == [1, 2, 3, 4, 5]
    for step in got:
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])


@pytest.mark.distributed
def test_full_recompute_matches(group):
    for step, loss in group["recompute_full"].items():
        assert abs(loss - group["dp2_distopt"][step]) <= 1e-6, (step, loss)


@pytest.mark.distributed
def test_cpt_rewarm_restarts_the_schedule_when_extended(group):
    lr = {r["step"]: r["lr"] for r in group["rewarm"]}
    assert sorted(lr) == list(range(1, 9))
    assert 3e-4 < lr[4] < lr[3] < lr[2] == pytest.approx(3e-3)  # the first run decays...
    assert lr[5] == 0.0 and lr[6] == pytest.approx(3e-3)  # ...the extension warms up again
    assert lr[6] > lr[7] > lr[8]


@pytest.mark.distributed
def test_mixtral_ep2_sft_trains_with_finite_aux_loss(group):
    records = group["mixtral_ep2"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert math.isfinite(r["loss"]) and math.isfinite(r["moe_aux_loss"]), r
        assert r["moe_aux_loss"] > 0


@pytest.mark.distributed
def test_neftune_alpha0_equals_off_and_alpha5_differs(group):
    assert group["sft_alpha0"] == group["sft_off"]
    for step in (1, 2, 3):  # the noise is in every training forward
        assert group["sft_alpha5"][step] != group["sft_off"][step]
        assert abs(group["sft_alpha5"][step] - group["sft_off"][step]) < 0.5


def _check_bound(probe: dict, alpha: float, hidden: int) -> None:
    noise = probe["noise"]  # [S, b, h]
    for row, cu in enumerate(probe["cu_seqlens"]):
        covered = torch.zeros(noise.shape[0], dtype=torch.bool)
        segments = real_segments(probe["loss_mask"][row], cu)
        assert segments
        for start, length in segments:
            bound = alpha / math.sqrt(length * hidden)
            part = noise[start:start + length, row].abs()
            assert part.max() <= bound * (1 + 1e-5)
            assert part.max() > 0.9 * bound  # uniform noise reaches close to the bound
            covered[start:start + length] = True
        assert torch.all(noise[~covered, row] == 0)  # padding and no-loss segments: no noise


@pytest.mark.distributed
@pytest.mark.parametrize("probe", ["probe_tp2", "probe_tp2_sp"])
def test_neftune_identical_on_tp_ranks_and_bounded(group, probe):
    a, b = (r[probe] for r in group["ranks"])
    assert {a["tp_rank"], b["tp_rank"]} == {0, 1}
    assert torch.equal(a["noise"], b["noise"])
    assert a["noise"].abs().max() > 0
    _check_bound(a, 5.0, 64)
    assert torch.all(a["eval_noise"] == 0)
    assert not torch.equal(a["other_step_noise"], a["noise"])


@pytest.mark.distributed
def test_neftune_differs_on_dp_ranks(group):
    a, b = (r["probe_dp2"] for r in group["ranks"])
    assert {a["dp_rank"], b["dp_rank"]} == {0, 1}
    assert torch.equal(a["scale"], b["scale"])  # same microbatch on both ranks...
    assert not torch.equal(a["noise"], b["noise"])  # ...different noise
    _check_bound(a, 5.0, 64)
    _check_bound(b, 5.0, 64)


@pytest.mark.distributed
def test_nan_stop_raises_without_saving(group):
    out = group["nan_stop"]
    assert "loss is nan at step 4" in out["error"] and "nan_policy" in out["error"]
    assert out["latest"] == 2  # the step-2 checkpoint; nothing after the NaN
    assert [r["step"] for r in out["records"]] == [1, 2, 3]


@pytest.mark.distributed
def test_nan_skip_skips_the_step(group):
    out = group["nan_skip"]
    assert out["error"] is None and out["latest"] == 6
    skipped = {r["step"]: r["skipped"] for r in out["records"]}
    assert skipped == {1: 0, 2: 0, 3: 0, 4: 1, 5: 0, 6: 0}


@pytest.mark.distributed
def test_fp8_without_transformer_engine_fails_with_documented_message(group):
    assert group["fp8_error"].startswith("precision.fp8: FP8 needs Transformer Engine")


# --- unit tests (no processes) ------------------------------------------------------------------
def test_token_scales_per_packed_sample_excluding_padding():
    loss_mask = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 0]], dtype=torch.float32)
    cu = [torch.tensor([0, 3, 6, 8])]  # samples [0,3) and [3,6), padding tail [6,8)
    scales = token_scales(loss_mask, cu, alpha=5.0, hidden_size=16)
    expected = torch.tensor([[5 / math.sqrt(3 * 16)] * 3 + [5 / math.sqrt(3 * 16)] * 3 + [0, 0]])
    assert torch.allclose(scales, expected)
    unpacked = token_scales(torch.tensor([[1, 1, 1, 1, 0, 0.]]), None, alpha=5.0, hidden_size=16)
    assert torch.allclose(unpacked, torch.tensor([[5 / 8.0] * 4 + [0, 0]]))


def test_packed_attention_mask_is_block_causal_with_window():
    mask = packed_attention_mask([torch.tensor([0, 3, 5])], 5, window=2)[0, 0]
    allowed = ~mask
    assert allowed[2, 1] and not allowed[2, 0]  # window 2: itself and one before
    assert not allowed[3, 2] and allowed[4, 3]  # nothing across the sample boundary
    assert not allowed[0, 1]  # causal


def test_synthetic_source_is_deterministic_and_packed_shapes():
    src = SyntheticSource(16, 24, 64, seed=7, packed=True)
    a, b = src[3], src[3]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["cu_seqlens"][-1] == 24 and a["tokens"].shape == (24,)
    assert torch.all(a["labels"][a["loss_mask"] == 0] == -100)


def test_train_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        TrainConfig(global_batch_size=6, micro_batch_size=4)
    with pytest.raises(ConfigError, match="train.decay_style"):
        load_experiment([cases.CPT_RECIPE], ["train.decay_style=step"])
    with pytest.raises(ConfigError, match="data.prefixes"):
        load_experiment([cases.CPT_RECIPE], ["data.kind=indexed"])
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        TrainConfig(global_batch_size=8, micro_batch_size=2).num_microbatches(3)


def test_flops_formula_matches_hand_count():
    from clinmega.models import get_preset

    m = get_preset("mistral-7b-v0.2")
    S = 4096
    h, f, L = 4096, 14336, 32
    per_layer = 2 * h * (32 + 16) * 128 + 2 * 32 * 128 * h + 4 * 32 * 128 * (S + 1) / 2 + 6 * h * f
    assert flops_per_token(m, S) == pytest.approx(3 * (L * per_layer + 2 * h * 32000))
    moe = get_preset("mixtral-8x7b")
    dense_mlp, moe_mlp = 6 * h * f, 2 * 6 * h * f + 2 * h * 8
    assert flops_per_token(moe, S) - flops_per_token(m, S) == pytest.approx(3 * L * (moe_mlp - dense_mlp))
    # ~6 x active params per token plus attention: Mistral 7B at 4k is ~ 4.9e10.
    assert 4.0e10 < flops_per_token(m, S) < 6.0e10


def test_indexed_cpt_source_through_megatron_builder(tmp_path):
    """Two corpora prepared by ``prepare pretrain`` are blended by megatron-core's
    BlendedMegatronDatasetBuilder (through clinmega.data.blend) and feed the sampler."""
    import json

    from clinmega.data.config import PretrainPrepConfig
    from clinmega.data.pretrain import prepare_pretrain
    from clinmega.training.data import GlobalBatchSampler, build_sources

    prefixes = []
    for name, word in (("clinical", "fever"), ("general", "river")):
        src = tmp_path / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": f"{word} {i} " * 40}) + "\n" for i in range(30)))
        prefix = str(tmp_path / name)
        prepare_pretrain(PretrainPrepConfig(inputs=[str(src)], output_prefix=prefix,
                                            tokenizer="mistral-v1", workers=1, progress=False))
        prefixes.append(prefix)
    cfg = load_experiment([cases.CPT_RECIPE], [
        "data.kind=indexed", f"data.prefixes=[{prefixes[0]},{prefixes[1]}]",
        "data.weights=[0.7,0.3]", "data.split=75,25,0",
        f"data.cache_dir={tmp_path / 'cache'}", "train.steps=4", "train.warmup_steps=1",
        "train.eval_interval=2", f"run_dir={tmp_path / 'run'}"])
    train_src, valid_src = build_sources(cfg)
    assert len(train_src) >= 4 * cfg.train.global_batch_size and valid_src is not None
    item = train_src[0]
    assert item["tokens"].shape == (cfg.train.seq_length,)
    assert torch.equal(item["tokens"][1:], item["labels"][:-1])
    sampler = GlobalBatchSampler(train_src, 8, 2, seed=0, shuffle=False)
    per_rank = [sampler.microbatches(1, r, 2) for r in range(2)]
    whole = sampler.microbatches(1, 0, 1)
    stacked = torch.cat([mb["tokens"] for mbs in per_rank for mb in mbs])
    assert torch.equal(stacked, torch.cat([mb["tokens"] for mb in whole]))  # DP splits the batch
    report = json.loads((tmp_path / "run" / "blend_report.json").read_text())
    rows = {r["source"]: r for r in report["splits"]["train"]["sources"]}
    assert rows["clinical"]["target_weight"] == pytest.approx(0.7)
    assert rows["clinical"]["realized_weight"] == pytest.approx(0.7, abs=0.1)
    assert rows["general"]["effective_epochs"] > 0


def test_lr_schedule_warmup_decay_and_rewarm():
    from types import SimpleNamespace

    from clinmega.training.optimizer import build_scheduler

    opt = SimpleNamespace(param_groups=[{"lr": 0.0, "weight_decay": 0.1}])
    cfg = TrainConfig(steps=20, lr=1e-3, min_lr=1e-4, warmup_steps=4, decay_style="linear")

    def lrs(scheduler, n):
        out = []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            scheduler.step(increment=1)
        return out

    first = lrs(build_scheduler(cfg, opt), 21)
    assert first[0] == 0.0 and first[4] == pytest.approx(1e-3) and first[20] == pytest.approx(1e-4)
    assert first[12] == pytest.approx(1e-3 - (1e-3 - 1e-4) * 8 / 16)
    longer = TrainConfig(steps=40, lr=1e-3, min_lr=1e-4, warmup_steps=4, decay_style="linear")
    rewarm = lrs(build_scheduler(longer, opt, start_step=20), 21)  # continue 20 -> 40 re-warmed
    assert rewarm[0] == 0.0 and rewarm[4] == pytest.approx(1e-3) and rewarm[20] == pytest.approx(1e-4)
    cosine = lrs(build_scheduler(TrainConfig(steps=20, lr=1e-3, min_lr=0.0, warmup_steps=0), opt), 21)
    assert cosine[10] == pytest.approx(5e-4) and cosine[20] == pytest.approx(0.0, abs=1e-12)
