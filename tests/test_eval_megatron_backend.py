"""Megatron backend vs HF backend on the same weights: same log-likelihoods, choices and generations.

The tiny HF model's weights are copied into a megatron-core GPTModel (local spec) with a minimal mapping
that lives only in this test (the project's conversion module is separate): per query group
[q heads of the group, k, v] rows for linear_qkv, and linear_fc1 = cat[gate, up] (REFERENCE.md §2).
"""

import json

import pytest
import torch

from eval_fixtures import TINY, tiny_hf_model_dir

import eval_parallel_cases as epc  # noqa: E402
from clinmega import runtime  # noqa: E402  (a broken import fails the module, it is not skipped)
from clinmega.config.schema import ParallelConfig, PrecisionConfig, RuntimeConfig  # noqa: E402
from clinmega.cli import main as clinmega_main  # noqa: E402
from clinmega.evaluation.backends.hf import HFBackend  # noqa: E402
from clinmega.evaluation.backends.megatron import MegatronBackend  # noqa: E402
from clinmega.evaluation.benchmarks import load_benchmark  # noqa: E402
from clinmega.evaluation.scoring import run_strategy  # noqa: E402
from clinmega.evaluation.strategies import PRESETS, Strategy  # noqa: E402
from clinmega.models import build_model, from_hf_config  # noqa: E402


def copy_hf_weights(hf_model, gpt) -> None:
    heads, groups = TINY["num_attention_heads"], TINY["num_key_value_heads"]
    src = {k: v.detach() for k, v in hf_model.state_dict().items()}
    d = src["model.layers.0.self_attn.q_proj.weight"].shape[0] // heads
    out = {"embedding.word_embeddings.weight": src["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": src["model.norm.weight"], "output_layer.weight": src["lm_head.weight"]}
    for i in range(len(gpt.decoder.layers)):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = src[h + "self_attn.q_proj.weight"].view(groups, heads // groups * d, -1)
        k = src[h + "self_attn.k_proj.weight"].view(groups, d, -1)
        v = src[h + "self_attn.v_proj.weight"].view(groups, d, -1)
        out[m + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])
        out[m + "self_attention.linear_proj.weight"] = src[h + "self_attn.o_proj.weight"]
        out[m + "input_layernorm.weight"] = src[h + "input_layernorm.weight"]
        out[m + "pre_mlp_layernorm.weight"] = src[h + "post_attention_layernorm.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat([src[h + "mlp.gate_proj.weight"], src[h + "mlp.up_proj.weight"]])
        out[m + "mlp.linear_fc2.weight"] = src[h + "mlp.down_proj.weight"]
    missing, unexpected = gpt.load_state_dict(out, strict=False)
    assert not unexpected and all("_extra_state" in k for k in missing), (missing, unexpected)


def backend_pair(model_dir):
    torch.set_num_threads(1)
    hf = HFBackend.from_pretrained(model_dir, batch_size=4)
    runtime.initialize(ParallelConfig(), RuntimeConfig(transformer_impl="local"))
    [gpt] = build_model(from_hf_config(model_dir), ParallelConfig(), PrecisionConfig(dtype="fp32"),
                        RuntimeConfig(transformer_impl="local"))
    copy_hf_weights(hf.model, gpt)
    return hf, MegatronBackend(gpt, hf.tokenizer, max_length=hf.max_length, batch_size=4)


@pytest.fixture(scope="module")
def backends():
    return backend_pair(tiny_hf_model_dir())


def test_logits_and_loglikelihoods_match(backends):
    hf, mg = backends
    ids = torch.tensor([hf.encode("Question: Which organ makes bile?\nAnswer: A")])
    with torch.no_grad():
        assert (hf.model(ids).logits - mg._logits(ids, [ids.shape[1]])).abs().max() < 1e-4
    requests = [("Question: Which vitamin?\nAnswer:", " A"), ("Question: Which vitamin?\nAnswer:", " Vitamin C"),
                ("Hi", " there you are")]
    assert mg.loglikelihood(requests) == pytest.approx(hf.loglikelihood(requests), abs=1e-3)


def test_same_choices_per_item(backends):
    hf, mg = backends
    items = load_benchmark("medqa_4options")[:10] + load_benchmark("pubmedqa")[:4]
    for strategy in (PRESETS["zero_shot"], Strategy("gen", scoring="generate", permutations=2, max_new_tokens=6)):
        ours, theirs = run_strategy(mg, items, [], strategy), run_strategy(hf, items, [], strategy)
        assert [r.votes for r in ours] == [r.votes for r in theirs]
        assert [r.pred for r in ours] == [r.pred for r in theirs]
    assert [r.outputs for r in ours] == [r.outputs for r in theirs]  # generated text too


def test_generation_with_mixed_prompt_lengths_matches(backends):
    hf, mg = backends
    prompts = ["Question: Which organ makes bile?\nAnswer:", "Hi", "Context: a b c d e f g.\nQuestion: yes?\nAnswer:"]
    assert mg.generate(prompts, 8) == hf.generate(prompts, 8)
    assert mg.generate(prompts, 8, temperature=0.8, top_p=0.95, seed=3) == \
        hf.generate(prompts, 8, temperature=0.8, top_p=0.95, seed=3)


def test_sliding_window_generation_past_the_window_matches():
    hf, mg = backend_pair(tiny_hf_model_dir(sliding_window=6))  # Mistral v0.1 style, window << prompt
    assert mg.model.config.window_size == (5, 0)
    prompts = ["Question: Which organ makes bile?\nAnswer:", "Hi", "Context: a b c d e f g.\nQuestion: yes?\nAnswer:"]
    assert mg.generate(prompts, 10) == hf.generate(prompts, 10)
    requests = [("Question: Which vitamin prevents scurvy in sailors?\nAnswer:", " Vitamin C")]
    assert mg.loglikelihood(requests) == pytest.approx(hf.loglikelihood(requests), abs=1e-3)


def test_from_checkpoint_round_trip(backends, tmp_path):
    from clinmega.models.dist_ckpt import save_model_weights

    hf, mg = backends
    save_model_weights([mg.model], tmp_path / "ckpt")
    loaded = MegatronBackend.from_checkpoint(tmp_path / "ckpt", model_config=tiny_hf_model_dir(),
                                             tokenizer=tiny_hf_model_dir())
    requests = [("Question: Which vitamin?\nAnswer:", " B"), ("Hello", " world")]
    assert loaded.loglikelihood(requests) == pytest.approx(hf.loglikelihood(requests), abs=1e-3)
    reports = {}
    for backend, model in (("megatron", tmp_path / "ckpt"), ("hf", tiny_hf_model_dir())):
        args = ["eval", str(model), "--backend", backend, "--benchmarks", "pubmedqa", "--limit", "4",
                "--out", str(tmp_path / backend), "--bootstrap", "50"]
        extra = ["--model-config", str(tiny_hf_model_dir()), "--tokenizer", str(tiny_hf_model_dir())]
        assert clinmega_main(args + (extra if backend == "megatron" else [])) == 0
        reports[backend] = json.loads((tmp_path / backend / "results.json").read_text())
    assert [i["pred"] for i in reports["megatron"]["items"]] == [i["pred"] for i in reports["hf"]["items"]]


@pytest.fixture(scope="module")
def parallel_group(tmp_path_factory):
    """One spawned 2-rank group runs every case of eval_parallel_cases.TABLE."""
    return epc.TABLE.spawn(tmp_path_factory.mktemp("eval_parallel"))


LAYOUTS = [epc.mistral_v01_tp2, epc.mistral_v01_pp2, epc.mistral_v01_pp2_vpp2, epc.mixtral_ep2,
           epc.mixtral_tp2_ep2, epc.mixtral_pp2]


@pytest.mark.distributed
@pytest.mark.parametrize("case", LAYOUTS, ids=lambda c: c.__name__)
def test_every_layout_matches_one_process_and_the_hf_backend(parallel_group, case):
    """Per-item log-likelihoods (fp32) at TP2, PP2, PP2 x VPP2, EP2, TP2+EP2 and PP2 equal one
    process' and the HF backend's on the exported folder to 1e-4 (the values are ~10-100 nats);
    greedy and sampled generations are the same strings."""
    results = parallel_group.ranks(case)
    for result in results:
        assert result["ll_diff"] < 1e-4, (case.__name__, result)
        assert result["greedy_equal"] and result["sampled_equal"], (case.__name__, result)
        assert any(result["generated"]), (case.__name__, result)  # something was generated
        full, local = result["params"]
        assert local < full, (case.__name__, result)  # the weights really are split across the two ranks
    assert results[0]["hf_ll_diff"] < 1e-4, (case.__name__, results[0])
    assert results[0]["ll_scale"] > 1.0, results[0]
    assert results[0]["chunks"] == (2 if "vpp2" in case.__name__ else 1)


@pytest.mark.distributed
def test_sequence_parallel_layout_scores_the_same_and_refuses_generation(parallel_group):
    for result in parallel_group.ranks(epc.mixtral_tp2_sp_ep2_scoring):
        assert result["sequence_parallel"] and result["ll_diff"] < 1e-4, result
        assert "sequence parallelism" in result["refused"], result
