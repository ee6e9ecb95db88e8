"""Multi-rank cases for test_eval_megatron_backend.py: a table of named case functions run by one
spawned 2-rank gloo group (tests/case_table.py).

For a dense model (tensor parallel 2, pipeline parallel 2, PP2 x virtual PP2) and a MoE model (expert
parallel 2, TP2 + EP2, pipeline parallel 2): build random weights in the plain layout (both ranks hold
everything; once per model), save them as a distributed checkpoint with an HF config.json and the
tokenizer next to it, score and generate with that model in one process' layout, export the
checkpoint to a HF folder (clinmega's exporter) and score it with the HF backend, then load the
checkpoint through `MegatronBackend.from_checkpoint` at each parallel layout and do the same. Returns
the differences.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from case_table import CaseTable

REQUESTS = [("Question: Which organ makes bile?\nAnswer:", " A"), ("Question: Which organ makes bile?\nAnswer:", " Liver"),
            ("Hi", " there, how are you")]
PROMPTS = ["Question: Which organ makes bile?\nAnswer:", "Hi", "Context: a b c d e f g h i j.\nQuestion: yes?\nAnswer:"]
ITEMS = 3  # medqa_4options items scored zero-shot (their option log-likelihoods, per item)


TABLE = CaseTable(__name__)


def scores(backend) -> dict:
    """The requests' log-likelihoods and, per benchmark item, its options' (zero-shot)."""
    from clinmega.evaluation.benchmarks import load_benchmark
    from clinmega.evaluation.scoring import run_strategy
    from clinmega.evaluation.strategies import PRESETS

    items = load_benchmark("medqa_4options")[:ITEMS]
    per_item = [r.outputs[0] for r in run_strategy(backend, items, [], PRESETS["zero_shot"])]
    return dict(requests=backend.loglikelihood(REQUESTS), items=per_item)


def generations(backend) -> dict:
    return dict(greedy=backend.generate(PROMPTS, 8), sampled=backend.generate(PROMPTS, 8, temperature=0.9, seed=2))


def max_diff(a: dict, b: dict) -> float:
    flat = lambda s: [*s["requests"], *(x for item in s["items"] for x in item)]  # noqa: E731
    return max(abs(x - y) for x, y in zip(flat(a), flat(b), strict=True))


@lru_cache(maxsize=None)
def plain_reference(root: Path, name: str, num_layers: int) -> dict:
    """Random ``name`` weights in the plain layout (both ranks hold everything), saved with config.json
    + tokenizer; their scores and generations in one process' layout, and the HF backend's scores on
    the exported folder (rank 0). Once per model for the whole group (each parallel-state
    initialisation creates gloo groups)."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from clinmega.config import ParallelConfig, PrecisionConfig, RuntimeConfig
    from clinmega.conversion.exporter import export_hf
    from clinmega.evaluation.backends.hf import HFBackend
    from clinmega.evaluation.backends.megatron import MegatronBackend
    from clinmega.models import build_model, get_preset, to_hf_config
    from clinmega.models.dist_ckpt import save_model_weights
    from clinmega.runtime import initialize
    from eval_fixtures import write_tokenizer

    torch.set_num_threads(1)
    cfg = get_preset(name, num_layers=num_layers)
    directory = root / "plain" / f"{name}-{num_layers}" / "ckpt"
    initialize(ParallelConfig(), RuntimeConfig(seed=1234))
    [model] = build_model(cfg, ParallelConfig(), PrecisionConfig(dtype="fp32"))
    with torch.no_grad():
        model.output_layer.weight.mul_(20.0)  # clear argmax margins for the greedy comparison
    save_model_weights([model], directory)
    if dist.get_rank() == 0:
        (directory / "config.json").write_text(json.dumps(to_hf_config(cfg, "float32")))
        write_tokenizer(directory)
    dist.barrier()
    reference = MegatronBackend(model.eval(), AutoTokenizer.from_pretrained(str(directory)),
                                cfg.max_position_embeddings, batch_size=2)
    hf_scores = None
    if dist.get_rank() == 0:
        export_hf(directory, directory.parent / "hf", model=cfg, assets=directory, progress=False)
        hf_scores = scores(HFBackend.from_pretrained(directory.parent / "hf", batch_size=2))
    return dict(directory=directory, scores=scores(reference), generations=generations(reference),
                hf_scores=hf_scores, params=sum(p.numel() for p in model.parameters()))


def parallel_vs_plain(tmp: Path, name: str, num_layers: int = 2, **layout) -> dict:
    """`plain_reference` against ``MegatronBackend.from_checkpoint`` of its folder at ``layout``."""
    from clinmega.evaluation.backends.megatron import MegatronBackend

    ref = plain_reference(tmp.parent, name, num_layers)
    parallel = MegatronBackend.from_checkpoint(ref["directory"], batch_size=2, **layout)
    got_scores, got_gen = scores(parallel), generations(parallel)
    return {
        "ll_diff": max_diff(ref["scores"], got_scores),
        "hf_ll_diff": None if ref["hf_scores"] is None else max_diff(ref["hf_scores"], got_scores),
        "ll_scale": max(abs(x) for x in got_scores["requests"]),
        "greedy_equal": ref["generations"]["greedy"] == got_gen["greedy"],
        "sampled_equal": ref["generations"]["sampled"] == got_gen["sampled"],
        "generated": got_gen["greedy"],
        "layout": layout,
        "chunks": len(parallel.chunks),
        "params": (ref["params"], sum(p.numel() for c in parallel.chunks for p in c.parameters())),
    }


@TABLE.case
def mistral_v01_tp2(tmp: Path) -> dict:
    return parallel_vs_plain(tmp, "tiny-mistral-v0.1", tensor_parallel=2)


@TABLE.case
def mistral_v01_pp2(tmp: Path) -> dict:
    return parallel_vs_plain(tmp, "tiny-mistral-v0.1", pipeline_parallel=2)


@TABLE.case
def mistral_v01_pp2_vpp2(tmp: Path) -> dict:
    return parallel_vs_plain(tmp, "tiny-mistral-v0.1", num_layers=4, pipeline_parallel=2,
                             virtual_pipeline_parallel=2)


@TABLE.case
def mixtral_ep2(tmp: Path) -> dict:
    return parallel_vs_plain(tmp, "tiny-mixtral", expert_parallel=2)


@TABLE.case
def mixtral_tp2_ep2(tmp: Path) -> dict:
    return parallel_vs_plain(tmp, "tiny-mixtral", tensor_parallel=2, expert_parallel=2,
                             expert_tensor_parallel=1)


@TABLE.case
def mixtral_pp2(tmp: Path) -> dict:
    return parallel_vs_plain(tmp, "tiny-mixtral", pipeline_parallel=2)


@TABLE.case
def mixtral_tp2_sp_ep2_scoring(tmp: Path) -> dict:
    """TP2 with sequence parallelism + EP2 (the Mixtral recipes' kind of layout, as the training loop's
    live model has it): scoring pads each round to a multiple of TP; generation is refused."""
    from transformers import AutoTokenizer

    from clinmega.config import ParallelConfig
    from clinmega.evaluation.backends.megatron import MegatronBackend, load_chunks

    ref = plain_reference(tmp.parent, "tiny-mixtral", 2)
    layout = ParallelConfig(tensor_parallel=2, sequence_parallel=True, expert_parallel=2, expert_tensor_parallel=1)
    loaded = load_chunks(ref["directory"], parallel=layout)
    backend = MegatronBackend(loaded.chunks, AutoTokenizer.from_pretrained(str(loaded.tokenizer)),
                              loaded.model.max_position_embeddings, batch_size=2)
    try:
        backend.generate(PROMPTS[:1], 2)
        refused = None
    except ValueError as err:
        refused = str(err)
    return dict(ll_diff=max_diff(ref["scores"], scores(backend)), refused=refused,
                sequence_parallel=backend.runner.config.sequence_parallel)
