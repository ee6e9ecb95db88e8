"""The layout planner against the published NVIDIA H100 configurations (REFERENCE.md §6)."""

import pytest

from clinmega.cli import main
from clinmega.config import ParallelConfig
from clinmega.launch.planner import (
    ClusterConfig,
    PlanConfig,
    estimate,
    local_parameters,
    lora_parameters,
    lora_report,
    lora_vs_full,
    rank_layouts,
)
from clinmega.models import count_parameters, get_preset
from clinmega.models.lora import LoRAConfig
from clinmega.models.flops import forward_flops_per_token

MIXTRAL_NEMO = ParallelConfig(pipeline_parallel=4, virtual_pipeline_parallel=8, expert_parallel=8,
                              expert_tensor_parallel=1)


def test_published_mistral_layout_fits_and_matches_throughput():
    # Llama2-7B FP8 on 8 H100s, TP1 PP1, seq 4096: 16,934 tok/s/GPU, 780 TFLOPS (NeMo 24.07).
    e = estimate(get_preset("mistral-7b-v0.1"), ParallelConfig(),
                 PlanConfig(seq_length=4096, global_batch=128, fp8=True), ClusterConfig(num_gpus=8))
    assert e.total_gb <= 80
    assert e.tokens_per_second_per_gpu == pytest.approx(16934, rel=0.15)


def test_published_mixtral_layout_fits_and_matches_throughput():
    # NeMo H100: 64 GPUs, seq 4096, TP1 PP4 EP8 VP8, MBS 1, GBS 256; ~468 TFLOPS BF16.
    cfg = get_preset("mixtral-8x7b")
    e = estimate(cfg, MIXTRAL_NEMO, PlanConfig(seq_length=4096, global_batch=256, micro_batch=1),
                 ClusterConfig(num_gpus=64))
    assert e.total_gb <= 80
    tflops = e.tokens_per_second_per_gpu * 3 * forward_flops_per_token(cfg, 4096) / 1e12
    assert tflops == pytest.approx(468, rel=0.15)


# Published H100 figures NOT used to calibrate PlanConfig.efficiency / fp8_speedup (REFERENCE.md §6),
# with the same 15% tolerance as the calibration anchors above.
def test_uncalibrated_llama3_8b_fp8_at_seq_8192_throughput():
    # Llama3-8B FP8 current scaling, seq 8192: 14,451 tok/s/GPU (Megatron-Bridge 25.11). Llama3-8B has
    # Mistral-7B v0.2's shapes (32 layers, hidden 4096, GQA 8, FFN 14336) with a 128,256 vocabulary.
    cfg = get_preset("mistral-7b-v0.2", vocab_size=128256, rope_theta=500000.0)
    e = estimate(cfg, ParallelConfig(), PlanConfig(seq_length=8192, global_batch=128, fp8=True),
                 ClusterConfig(num_gpus=8))
    assert e.tokens_per_second_per_gpu == pytest.approx(14451, rel=0.15)  # planner: 15,372 (+6%)


def test_uncalibrated_llama2_7b_packed_sft_fp8_throughput():
    # Llama2-7B SFT packed to 4096, FP8, 8 H100: 17,120 tok/s/GPU (NeMo 24.07). Llama2-7B: Mistral-7B
    # v0.2's shapes with full multi-head attention (32 KV heads) and FFN 11008.
    llama2 = get_preset("mistral-7b-v0.2", ffn_hidden_size=11008, num_query_groups=32, rope_theta=10000.0)
    e = estimate(llama2, ParallelConfig(), PlanConfig(seq_length=4096, global_batch=128, fp8=True),
                 ClusterConfig(num_gpus=8))
    assert e.tokens_per_second_per_gpu == pytest.approx(17120, rel=0.15)  # planner: 18,458 (+8%)


def test_mixtral_does_not_fit_unsharded_on_one_node():
    e = estimate(get_preset("mixtral-8x7b"), ParallelConfig(), PlanConfig(),
                 ClusterConfig(num_gpus=8))
    assert e.total_gb > 80 and e.memory_gb["weights"] > 80


def test_recompute_and_distributed_optimizer_reduce_memory():
    cfg, cluster = get_preset("mistral-7b-v0.2"), ClusterConfig(num_gpus=8)
    mem = {r: estimate(cfg, ParallelConfig(), PlanConfig(recompute=r), cluster).memory_gb
           for r in ("none", "selective", "full")}
    assert mem["none"]["activations"] > mem["selective"]["activations"] > mem["full"]["activations"]
    plain = estimate(cfg, ParallelConfig(), PlanConfig(distributed_optimizer=False), cluster)
    assert plain.memory_gb["optimizer"] == pytest.approx(8 * mem["selective"]["optimizer"])


@pytest.mark.parametrize("name", ["mistral-7b-v0.3", "mixtral-8x7b"])
def test_local_parameters_add_up_to_the_model(name):
    cfg = get_preset(name)
    dense, experts = local_parameters(cfg, ParallelConfig())
    assert dense + experts == count_parameters(cfg)
    dense2, experts2 = local_parameters(cfg, ParallelConfig(tensor_parallel=2, sequence_parallel=True))
    assert dense2 == pytest.approx(dense / 2)


def test_ranked_layouts_all_fit_and_are_sorted():
    best, tried = rank_layouts(get_preset("mixtral-8x7b"), ClusterConfig(num_gpus=64), PlanConfig())
    assert best and tried > len(best)
    assert all(e.total_gb <= 80 for e in best)
    assert [e.step_seconds for e in best] == sorted(e.step_seconds for e in best)


def test_plan_cli_prints_a_table(capsys):
    assert main(["plan", "--model", "mistral-7b-v0.1", "--gpus", "8", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "TP1 PP1 DP8" in out and "tok/s/GPU" in out
    assert main(["plan", "--model", "mixtral-8x7b", "--gpus", "1", "--gpu-memory", "24"]) == 1


# --- LoRA: frozen base, grads and optimizer state for the adapters only -------------------------
GIB = 1024**3
R16 = LoRAConfig(rank=16, alpha=32.0)


def test_lora_mistral_7b_on_one_node_by_hand():
    cfg, cluster = get_preset("mistral-7b-v0.1"), ClusterConfig(num_gpus=8, gpu_memory_gb=80)
    # rank*(out+in) per layer: qkv (32+2*8)*128 x 4096, o 4096x4096, fc1 2*14336 x 4096, fc2 4096x14336
    per_layer = 16 * ((6144 + 4096) + (4096 + 4096) + (28672 + 4096) + (4096 + 14336))
    adapters = 32 * per_layer
    assert adapters == 35_651_584
    base = 2 * 32000 * 4096 + 32 * (4096 * 128 * 80 + 3 * 4096 * 14336 + 2 * 4096) + 4096
    plan = PlanConfig(seq_length=4096, global_batch=128, micro_batch=2)
    full, lora = lora_vs_full(cfg, ParallelConfig(), plan, cluster, R16)
    m = lora.memory_gb
    assert m["weights"] == pytest.approx((base + adapters) * 2 / GIB)
    assert m["grads"] == pytest.approx(adapters * 4 / GIB)
    assert m["optimizer"] == pytest.approx(adapters * 12 / 8 / GIB)
    assert m["activations"] == full.memory_gb["activations"]
    assert full.total_gb > 80 >= lora.total_gb
    # TP2: column-parallel B (qkv, fc1) and row-parallel A (o, fc2) are split, the other replicated
    tp2 = 32 * 16 * ((3072 + 4096) + (4096 + 2048) + (14336 + 4096) + (4096 + 7168))
    assert sum(lora_parameters(cfg, R16, ParallelConfig(tensor_parallel=2))) == tp2


def test_lora_mixtral_8x7b_on_one_node_by_hand():
    cfg, cluster = get_preset("mixtral-8x7b"), ClusterConfig(num_gpus=8, gpu_memory_gb=80)
    layout = ParallelConfig(expert_parallel=8, expert_tensor_parallel=1)
    attention = 32 * 16 * ((6144 + 4096) + (4096 + 4096))          # replicated over DP8
    experts = 32 * 1 * 16 * ((28672 + 4096) + (4096 + 14336))      # 1 expert per GPU and layer
    dense_base = 2 * 32000 * 4096 + 32 * (4096 * 128 * 80 + 4096 * 8 + 2 * 4096) + 4096
    expert_base = 8 * 3 * 4096 * 14336 * 32 // 8
    plan = PlanConfig(seq_length=4096, global_batch=128, micro_batch=1)
    full, lora = lora_vs_full(cfg, layout, plan, cluster, R16)
    m = lora.memory_gb
    assert m["weights"] == pytest.approx((dense_base + expert_base + attention + experts) * 2 / GIB)
    assert m["grads"] == pytest.approx((attention + experts) * 4 / GIB)
    # expert data-parallel size 8 / (EP8 * ETP1 * PP1) = 1: expert adapters' state is not sharded
    assert m["optimizer"] == pytest.approx((attention / 8 + experts) * 12 / GIB)
    assert m["activations"] == full.memory_gb["activations"]
    assert full.total_gb > 80 >= lora.total_gb
    assert sum(lora_parameters(cfg, R16)) == attention + 8 * experts  # whole model: 219.2M


def test_lora_report_of_the_recipes():
    from pathlib import Path

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    text = lora_report([recipes / "mistral_7b_lora_sft.yaml", recipes / "mixtral_8x7b_lora_sft.yaml"])
    assert text.count("lora/full memory") == 2 and "219.2M adapter parameters" in text


def test_plan_cli_with_lora(capsys):
    args = ["plan", "--model", "mixtral-8x7b", "--gpus", "8", "--global-batch", "128", "--top", "3",
            "--gpus-per-node", "8"]
    assert main(args + ["--recompute", "none"]) == 1  # full fine-tuning fits no 8-GPU layout
    capsys.readouterr()
    assert main(args + ["--recompute", "none", "--lora-rank", "16"]) == 0
    out = capsys.readouterr().out
    assert "LoRA rank 16" in out and "tok/s/GPU" in out
    assert main(args + ["--lora-rank", "16", "--lora-targets", "linear_qkv,router"]) == 2
