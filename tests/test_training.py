"""Training stage: convergence, DP/optimizer equivalence, kill-and-resume, SIGTERM, NEFTune,
MoE, NaN policy, FP8 gating, CLI/plot. Multi-rank cases are the named case functions of
training_cases.TABLE, all run by one spawned 2-rank gloo group; each test names the case it asserts
on. Whole-process behaviour (SIGKILL, SIGTERM, torchrun) runs in subprocesses."""

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
    sigkill_after_checkpoint(cli(run_dir, "train.steps=1000"), run_dir / "checkpoints", 10)
    return run_dir


def sigkill_after_checkpoint(cmd: list[str], ckpt: Path, step: int) -> None:
    """Run ``cmd`` and SIGKILL it once ``ckpt``'s latest checkpoint is ``step``."""
    proc = subprocess.Popen(cmd, env=ENV, cwd=cases.ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (ckpt / "latest").is_file() and read_latest(ckpt) == step, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL


# `clinmega train ...` that SIGKILLs its process group (itself and any writer processes) once every
# tensor of its step-20 checkpoint is on disk (megatron-core's dist_checkpointing.save returned),
# before that checkpoint is published.
KILL_DURING_STEP20_SAVE = """
import os, signal, sys
from megatron.core import dist_checkpointing
real = dist_checkpointing.save
def save(state, directory, *args, **kwargs):
    out = real(state, directory, *args, **kwargs)
    if "iter_0000020" in os.path.basename(str(directory)):  # its temporary name
        os.killpg(os.getpgid(0), signal.SIGKILL)
    return out
dist_checkpointing.save = save
from clinmega.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def killed_while_saving(tmp_path_factory) -> Path:
    """A run (configured for 1000 steps) SIGKILLed while its step-20 checkpoint is being written."""
    run_dir = tmp_path_factory.mktemp("killed_while_saving")
    log = run_dir.with_name(run_dir.name + ".stderr")
    with open(log, "w") as err:
        proc = subprocess.run([PY, "-c", KILL_DURING_STEP20_SAVE, *cli(run_dir, "train.steps=1000")[3:]],
                              env=ENV, cwd=cases.ROOT, stdout=subprocess.DEVNULL, stderr=err,
                              timeout=240, start_new_session=True)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-4000:]
    return run_dir


def logged_steps(lines: list[str]) -> list[int]:
    return [json.loads(line)["step"] for line in lines if line.strip() and '"loss"' in line]


def resume(run_dir: Path) -> tuple[dict, list[int]]:
    """Resume ``run_dir`` to step 20; returns the summary and the steps this process logged."""
    metrics = run_dir / "metrics.jsonl"
    before = len(metrics.read_text().splitlines())
    proc = run_ok(cli(run_dir))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return summary, logged_steps(metrics.read_text().splitlines()[before:])


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
    summary, steps = resume(killed)  # resumes from latest = 10
    assert summary["start_step"] == 10 and summary["step"] == 20, summary
    assert steps == list(range(11, 21)), steps  # no step before 11 was run again
    ref, resumed = cases.losses(reference), cases.losses(killed)
    for step in range(11, 21):
        assert resumed[step] == ref[step], (step, resumed[step], ref[step])
    assert read_latest(killed / "checkpoints") == 20
    kept = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("iter_"))
    assert kept == ["iter_0000010", "iter_0000020"], kept  # keep_last = 2


def test_kill_while_saving_resumes_from_the_previous_checkpoint(reference, killed_while_saving):
    run_dir = killed_while_saving
    ckpt = run_dir / "checkpoints"
    assert read_latest(ckpt) == 10  # the half-published step 20 is not the newest checkpoint
    partial = [p.name for p in ckpt.iterdir() if "iter_0000020" in p.name]
    assert partial and "iter_0000020" not in partial, partial  # written, under a temporary name
    assert max(logged_steps((run_dir / "metrics.jsonl").read_text().splitlines())) == 20
    summary, steps = resume(run_dir)
    assert summary["start_step"] == 10 and summary["status"] == "done", summary
    assert steps == list(range(11, 21)), steps
    ref, resumed = cases.losses(reference), cases.losses(run_dir)
    for step in range(11, 21):
        assert resumed[step] == ref[step], (step, resumed[step], ref[step])
    assert read_latest(ckpt) == 20
    kept = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("iter_"))
    assert kept == ["iter_0000010", "iter_0000020"], kept  # the partial one was replaced


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


# --- the 2-rank group: one spawn runs every case of training_cases.TABLE ---------------------
@pytest.fixture(scope="module")
def group(tmp_path_factory):
    return cases.TABLE.spawn(tmp_path_factory.mktemp("group"))


@pytest.mark.distributed
@pytest.mark.parametrize("case", [cases.dp2_distopt, cases.dp2_plain], ids=lambda c: c.__name__)
def test_dp2_matches_dp1(group, reference, case):
    ref, got = cases.losses(reference), group[case]["losses"]
    assert sorted(got) == list(range(1, 21))
    for step in got:
        assert abs(got[step] - ref[step]) <= 1e-5, (case.__name__, step, got[step], ref[step])


@pytest.mark.distributed
def test_pipeline_with_virtual_stages_matches_dp1(group, reference):
    """PP2 x VPP2 (interleaved 1F1B) from the same initial weights (checkpoint.load_weights)."""
    ref, got = cases.losses(reference), group[cases.pp2_vpp2]
    assert sorted(got) == [1, 2, 3, 4, 5]
    for step in got:
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])


@pytest.mark.distributed
def test_full_recompute_matches(group):
    recompute, plain = group[cases.recompute_full], group[cases.dp2_distopt]
    assert sorted(recompute["losses"]) == [1, 2, 3]
    for step, loss in recompute["losses"].items():
        assert abs(loss - plain["losses"][step]) <= 1e-6, (step, loss)
    # ...and it did recompute: the backward ran every layer's forward once more.
    counts = (recompute["layer_forwards_per_step"], plain["layer_forwards_per_step"])
    assert plain["layer_forwards_per_step"] == 4 * 2, counts  # 4 layers x 2 microbatches per rank
    assert recompute["layer_forwards_per_step"] == 2 * plain["layer_forwards_per_step"], counts


@pytest.mark.distributed
def test_pp2_vpp2_benchmark_accuracy_leaves_the_losses_bit_identical(group):
    """train.eval_benchmarks on the live PP2 x VPP2 model (dropout on): the same losses to the last
    bit, accuracy rows at steps 2 and 4 (test_training_benchmark_eval.py: single process)."""
    out = group[cases.pp2_vpp2_benchmark_eval]
    assert sorted(out["plain"]) == [1, 2, 3, 4] and out["scored"] == out["plain"]
    rows = [r for r in out["records"] if "eval/seconds" in r]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert all(0.0 <= r[f"eval/{name}/acc"] <= 1.0 for name in cases.BENCHMARKS), r


@pytest.mark.distributed
def test_cpt_rewarm_restarts_the_schedule_when_extended(group):
    lr = {r["step"]: r["lr"] for r in group[cases.rewarm]}
    assert sorted(lr) == list(range(1, 9))
    assert 3e-4 < lr[4] < lr[3] < lr[2] == pytest.approx(3e-3)  # the first run decays...
    assert lr[5] == 0.0 and lr[6] == pytest.approx(3e-3)  # ...the extension warms up again
    assert lr[6] > lr[7] > lr[8]


@pytest.mark.distributed
def test_mixtral_ep2_sft_trains_with_finite_aux_loss(group):
    records = group[cases.mixtral_ep2]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert math.isfinite(r["loss"]) and math.isfinite(r["moe_aux_loss"]), r
        assert r["moe_aux_loss"] > 0


def hand_aux_loss(call: dict, topk: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The Switch Transformer / Mixtral load-balancing loss of one router call, by hand from the
    router's input and weight: E * sum_e f_e * P_e over the call's T tokens (the whole
    microbatch on this rank, padding included: clinmega passes megatron-core no padding mask),
    f_e = the share of the T*k top-k choices that go to expert e, P_e = the mean over the T
    tokens of the softmax over all E logits. Differentiable in ``weight`` (f is a count)."""
    x = call["x"].reshape(-1, call["x"].shape[-1]).double()
    weight = call["weight"].double() if weight is None else weight
    logits = x @ weight.T
    T, E = logits.shape
    chosen = logits.detach().topk(topk, dim=-1).indices
    f = torch.zeros(E, dtype=torch.float64).index_add_(0, chosen.flatten(),
                                                      torch.ones(T * topk, dtype=torch.float64))
    return E * torch.sum(f / (T * topk) * logits.softmax(dim=-1).mean(dim=0))


def _aux_calls(probes: list[dict], step: int, layer: int | None = None) -> list[dict]:
    return [c for p in probes for c in p["calls"]
            if c["step"] == step and (layer is None or c["layer"] == layer)]


@pytest.mark.distributed
@pytest.mark.parametrize("case", [cases.mixtral_aux_ep2, cases.mixtral_aux_dp2],
                         ids=lambda c: c.__name__)
def test_mixtral_aux_loss_logged_and_added_as_defined(group, case):
    """Tiny Mixtral SFT (packed; prompts and padding carry no loss) with the aux loss on, under
    EP2 and DP2. From the router inputs captured in real training steps: the logged
    ``moe_aux_loss`` is the mean over every microbatch of the global batch (both DP ranks) and
    over layers of the per-microbatch loss (megatron-core's ``aux_loss`` type: f and P over the
    microbatch's tokens on its rank), and what the step adds to the loss is coeff x that mean:
    its gradient on the last layer's router weight (the step's gradient minus the same step's
    with the aux loss off) is plain autograd's of coeff x mean."""
    probes = group.ranks(case)
    p0 = probes[0]
    assert (p0["dp_size"], p0["ep_size"]) == ((2, 2) if case is cases.mixtral_aux_ep2 else (2, 1))
    assert {p["dp_rank"] for p in probes} == {0, 1}
    topk, E, layers, coeff = p0["topk"], p0["num_experts"], p0["num_layers"], p0["coeff"]
    assert (topk, E, coeff) == (2, 8, 0.02)
    records = {r["step"]: r for r in p0["records"]}
    assert sorted(records) == [1, 2]
    for step in (0, 1):
        calls = _aux_calls(probes, step)
        assert len(calls) == 2 * 2 * layers  # ranks x microbatches per rank x MoE layers
        for c in calls:  # the hand logits are the router's: same top-k experts
            logits = c["x"].reshape(-1, c["x"].shape[-1]).double() @ c["weight"].double().T
            chosen = torch.zeros_like(c["routing_map"]).scatter(1, logits.topk(topk, -1).indices, True)
            assert torch.equal(chosen, c["routing_map"])
        by_hand = float(sum(hand_aux_loss(c, topk) for c in calls) / len(calls))
        assert 1.0 <= by_hand < 1.5, by_hand  # 1 = perfectly balanced; E = all on one expert
        logged = records[step + 1]["moe_aux_loss"]
        assert logged == pytest.approx(by_hand, rel=1e-5), (step, logged, by_hand)
    last = max(c["layer"] for c in p0["calls"])
    calls = _aux_calls(probes, 0, last)
    assert len(calls) == 2 * 2 and all(torch.equal(c["weight"], calls[0]["weight"]) for c in calls)
    weight = calls[0]["weight"].double().requires_grad_()
    mean = sum(hand_aux_loss(c, topk, weight) for c in calls) / len(calls)
    (expected,) = torch.autograd.grad(coeff * mean, weight)
    assert expected.norm() > 1e-3
    loss_tokens = sum(m["loss_tokens"] for p in probes for m in p["microbatches"][0])
    tokens = sum(m["tokens"] for p in probes for m in p["microbatches"][0])
    assert loss_tokens < 0.5 * tokens  # SFT: most tokens carry no loss (would scale the aux loss)
    for p in probes:
        added = (p["grad_with"] - p["grad_without"]).double()
        assert (added - expected).norm() <= 1e-4 * expected.norm(), (
            float(added.norm() / expected.norm()))


@pytest.mark.distributed
def test_mixtral_aux_loss_equals_single_process(group, tmp_path):
    """From the same initial weights on the same global batches, one process (4 microbatches)
    logs the EP2 and DP2 runs' aux loss (2 microbatches per rank) and loss."""
    ep2, dp2 = group[cases.mixtral_aux_ep2], group[cases.mixtral_aux_dp2]
    run_dir = tmp_path / "dp1"
    run_ok([PY, "-m", "clinmega.cli", "train", str(cases.SFT_RECIPE), f"run_dir={run_dir}",
            *cases.MIXTRAL_AUX, f"checkpoint.load_weights={dp2['init']}"])
    single = {r["step"]: r for r in read_metrics(run_dir)}
    assert sorted(single) == [1, 2]
    for layout in (ep2, dp2):
        got = {r["step"]: r for r in layout["records"]}
        for step in (1, 2):
            for key in ("moe_aux_loss", "loss"):
                assert got[step][key] == pytest.approx(single[step][key], rel=1e-5), (
                    step, key, got[step][key], single[step][key])


@pytest.mark.distributed
def test_neftune_alpha0_equals_off_and_alpha5_differs(group):
    off, alpha0, alpha5 = group[cases.sft_off], group[cases.sft_alpha0], group[cases.sft_alpha5]
    assert sorted(off) == [1, 2, 3]
    assert alpha0 == off
    for step in (1, 2, 3):  # the noise is in every training forward
        assert alpha5[step] != off[step]
        assert abs(alpha5[step] - off[step]) < 0.5


def _check_bound(noise: torch.Tensor, loss_mask: torch.Tensor, cu_seqlens: list, alpha: float,
                 hidden: int) -> None:
    """``noise`` [S, b, h] of one microbatch: bounded by alpha/sqrt(L*d) per real segment (the
    code's own segments), zero elsewhere."""
    for row, cu in enumerate(cu_seqlens):
        covered = torch.zeros(noise.shape[0], dtype=torch.bool)
        segments = real_segments(loss_mask[row], cu)
        assert segments
        for start, length in segments:
            bound = alpha / math.sqrt(length * hidden)
            part = noise[start:start + length, row].abs()
            assert part.max() <= bound * (1 + 1e-5)
            assert part.max() > 0.9 * bound  # uniform noise reaches close to the bound
            covered[start:start + length] = True
        assert torch.all(noise[~covered, row] == 0)  # padding and no-loss segments: no noise


def _probe_rows(probe: dict, microbatch: int) -> list[dict]:
    """The hand-made rows (training_cases.PROBE_ROWS) of this rank's microbatch: global batch
    ``step`` is items step*G ... of the (unshuffled) probe source, DP rank r takes its G/dp share."""
    G, mbs = 8, 2  # the SFT recipe's global and micro batch
    dp = 2 // probe["tp_size"]
    first = probe["step"] * G + probe["dp_rank"] * (G // dp) + microbatch * mbs
    return [cases.PROBE_ROWS[(first + j) % 2] for j in range(mbs)]


def expected_noise(probe: dict, microbatch: int, step: int | None = None) -> torch.Tensor:
    """NEFTune's noise as documented, rebuilt independently: eps ~ U(-1, 1) of shape [S, b, h]
    from a torch generator seeded with numpy SeedSequence(seed, step, dp rank, microbatch), times
    alpha/sqrt(L*d) with L counted by hand (up to each segment's last loss token)."""
    import numpy as np

    step = probe["step"] if step is None else step
    rows = _probe_rows(probe, microbatch)
    S, h, alpha = cases.PROBE_SEQ, probe["hidden"], probe["alpha"]
    seq = np.random.SeedSequence([probe["seed"], step, probe["dp_rank"], microbatch])
    gen = torch.Generator().manual_seed(int(seq.generate_state(1, np.uint64)[0] >> 1))
    eps = torch.rand((S, len(rows), h), generator=gen) * 2 - 1
    scale = torch.zeros(S, len(rows))
    for j, row in enumerate(rows):
        for start, length in row["L"]:
            scale[start:start + length, j] = alpha / math.sqrt(length * h)
    return eps * scale[:, :, None]


def local_shard(probe: dict, full: torch.Tensor) -> torch.Tensor:
    if not probe["sequence_parallel"]:
        return full
    n = full.shape[0] // probe["tp_size"]
    return full[probe["tp_rank"] * n:(probe["tp_rank"] + 1) * n]


def assert_documented_noise(probe: dict) -> None:
    """Every microbatch's noise, inside real Trainer.step calls, is the documented draw."""
    assert len(probe["at_step"]) == len(probe["at_next"]) == 8 // (2 // probe["tp_size"]) // 2
    for i, (now, nxt) in enumerate(zip(probe["at_step"], probe["at_next"])):
        expected = local_shard(probe, expected_noise(probe, i))
        assert expected.abs().max() > 0.1
        assert now["noise"].shape == expected.shape
        assert (now["noise"] - expected).abs().max() <= 1e-6, i
        expected_next = local_shard(probe, expected_noise(probe, i, probe["step"] + 1))
        assert (nxt["noise"] - expected_next).abs().max() <= 1e-6, i
    for eval_mb in probe["at_eval"]:
        assert torch.all(eval_mb["noise"] == 0)  # never at eval


@pytest.mark.distributed
@pytest.mark.parametrize("case", [cases.neftune_probe_tp2, cases.neftune_probe_tp2_sp,
                                  cases.neftune_probe_dp2], ids=lambda c: c.__name__)
def test_neftune_noise_is_the_documented_draw_in_trainer_steps(group, case):
    probes = group.ranks(case)
    assert len(probes[0]["at_eval"]) == len(probes[0]["at_step"])
    for probe in probes:
        assert_documented_noise(probe)


def _full_noise(probes: list[dict], key: str, microbatch: int) -> torch.Tensor:
    """The full-sequence noise of one microbatch: rank 0's, or both SP shards concatenated."""
    parts = [p[key][microbatch]["noise"] for p in sorted(probes, key=lambda p: p["tp_rank"])]
    return torch.cat(parts) if probes[0]["sequence_parallel"] else parts[0]


@pytest.mark.distributed
@pytest.mark.parametrize("case", [cases.neftune_probe_tp2, cases.neftune_probe_tp2_sp],
                         ids=lambda c: c.__name__)
def test_neftune_identical_on_tp_ranks_and_bounded(group, case):
    a, b = group.ranks(case)
    assert {a["tp_rank"], b["tp_rank"]} == {0, 1}
    for i in range(len(a["at_step"])):
        noise = _full_noise([a, b], "at_step", i)
        if not a["sequence_parallel"]:
            assert torch.equal(a["at_step"][i]["noise"], b["at_step"][i]["noise"])
        assert noise.abs().max() > 0
        _check_bound(noise, a["loss_mask"][i], a["cu_seqlens"][i], 5.0, 64)
        assert torch.all(a["at_eval"][i]["noise"] == 0)
        assert not torch.equal(_full_noise([a, b], "at_next", i), noise)


@pytest.mark.distributed
def test_neftune_sequence_parallel_noise_equals_tp2_noise(group):
    """Each SP rank's shard of the noise is the matching slice of the non-SP TP2 noise."""
    tp2 = group.ranks(cases.neftune_probe_tp2)
    for sp in group.ranks(cases.neftune_probe_tp2_sp):
        assert sp["sequence_parallel"]
        for i, mb in enumerate(sp["at_step"]):
            full = tp2[0]["at_step"][i]["noise"]
            n = full.shape[0] // 2
            assert mb["noise"].shape[0] == n
            part = full[sp["tp_rank"] * n:(sp["tp_rank"] + 1) * n]
            assert (mb["noise"] - part).abs().max() <= 1e-6, (sp["tp_rank"], i)


@pytest.mark.distributed
def test_neftune_differs_on_dp_ranks(group):
    a, b = group.ranks(cases.neftune_probe_dp2)
    assert {a["dp_rank"], b["dp_rank"]} == {0, 1}
    for i in range(len(a["at_step"])):
        assert torch.equal(a["scale"][i], b["scale"][i])  # same microbatch on both ranks...
        assert not torch.equal(a["at_step"][i]["noise"], b["at_step"][i]["noise"])  # ...different noise
        _check_bound(a["at_step"][i]["noise"], a["loss_mask"][i], a["cu_seqlens"][i], 5.0, 64)
        _check_bound(b["at_step"][i]["noise"], b["loss_mask"][i], b["cu_seqlens"][i], 5.0, 64)


@pytest.mark.distributed
def test_nan_stop_raises_without_saving(group):
    out = group[cases.nan_stop]
    assert "loss is nan at step 4" in out["error"] and "nan_policy" in out["error"]
    assert out["latest"] == 2  # the step-2 checkpoint; nothing after the NaN
    assert [r["step"] for r in out["records"]] == [1, 2, 3]


@pytest.mark.distributed
def test_nan_skip_skips_the_step(group):
    out = group[cases.nan_skip]
    assert out["error"] is None and out["latest"] == 6
    skipped = {r["step"]: r["skipped"] for r in out["records"]}
    assert skipped == {1: 0, 2: 0, 3: 0, 4: 1, 5: 0, 6: 0}
    weights = out["weights_before_step"]
    assert sorted(weights) == [1, 2, 3, 4, 5, 6]
    assert torch.equal(weights[5], weights[4])  # the skipped step left the weights unchanged
    for step in (2, 3, 5):  # the others updated them (step 1 runs at the warmup's lr 0)
        assert not torch.equal(weights[step + 1], weights[step]), step


@pytest.mark.distributed
def test_fp8_without_transformer_engine_fails_with_documented_message(group):
    assert group[cases.fp8_without_te].startswith("precision.fp8: FP8 needs Transformer Engine")


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
