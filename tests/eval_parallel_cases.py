"""Multi-rank cases for test_eval_megatron_backend.py: a table of named case functions run by one
spawned 2-rank gloo group (tests/case_table.py).

For a dense model (tensor parallel 2) and a MoE model (expert parallel 2): build random weights in the
plain layout (both ranks hold everything), save them as a distributed checkpoint with an HF config.json
and the tokenizer next to it, score and generate with that model, then load the checkpoint through
`MegatronBackend.from_checkpoint` at the parallel layout and do the same. Returns the differences.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from case_table import CaseTable

REQUESTS = [("Question: Which organ makes bile?\nAnswer:", " A"), ("Question: Which organ makes bile?\nAnswer:", " Liver"),
            ("Hi", " there, how are you")]
PROMPTS = ["Question: Which organ makes bile?\nAnswer:", "Hi", "Context: a b c d e f g h i j.\nQuestion: yes?\nAnswer:"]


TABLE = CaseTable(__name__)


def parallel_vs_plain(tmp: Path, name: str, **layout) -> dict:
    """Random ``name`` weights in the plain layout, saved with config.json + tokenizer; its scores
    and generations against ``MegatronBackend.from_checkpoint`` of that folder at ``layout``."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from clinmega.config import ParallelConfig, PrecisionConfig, RuntimeConfig
    from clinmega.evaluation.backends.megatron import MegatronBackend
    from clinmega.models import build_model, get_preset, to_hf_config
    from clinmega.models.dist_ckpt import save_model_weights
    from clinmega.runtime import initialize
    from eval_fixtures import write_tokenizer

    torch.set_num_threads(1)
    cfg = get_preset(name, num_layers=2)
    directory = tmp / "ckpt"
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
    parallel = MegatronBackend.from_checkpoint(directory, batch_size=2, **layout)
    lls = reference.loglikelihood(REQUESTS), parallel.loglikelihood(REQUESTS)
    return {
        "ll_diff": max(abs(a - b) for a, b in zip(*lls)),
        "greedy_equal": reference.generate(PROMPTS, 8) == parallel.generate(PROMPTS, 8),
        "sampled_equal": reference.generate(PROMPTS, 8, temperature=0.9, seed=2)
        == parallel.generate(PROMPTS, 8, temperature=0.9, seed=2),
        "layout": layout,
        "params": (sum(p.numel() for p in reference.model.parameters()),
                   sum(p.numel() for p in parallel.model.parameters())),
    }


@TABLE.case
def mistral_v01_tp2(tmp: Path) -> dict:
    return parallel_vs_plain(tmp, "tiny-mistral-v0.1", tensor_parallel=2)


@TABLE.case
def mixtral_ep2(tmp: Path) -> dict:
    return parallel_vs_plain(tmp, "tiny-mixtral", expert_parallel=2)
