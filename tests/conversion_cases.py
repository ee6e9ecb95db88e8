"""Shared helpers for the conversion tests (tiny random HF models and logits on both sides) and the\ntable of 2-rank conversion cases that test_conversion.py spawns once."""

from __future__ import annotations

from pathlib import Path

import torch

from case_table import CaseTable

TOKENS_SEQ = 24  # longer than the tiny v0.1 sliding window (8)

HF_SHAPES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 initializer_range=0.1)
KINDS = {
    "mistral-v0.1": dict(vocab_size=32000, rope_theta=10_000.0, sliding_window=8),
    "mistral-v0.3": dict(vocab_size=32768, rope_theta=1_000_000.0, sliding_window=None),
    "mixtral": dict(vocab_size=32000, rope_theta=1_000_000.0, num_local_experts=8,
                    num_experts_per_tok=2, router_aux_loss_coef=0.02),
}
TOKENIZER = Path(__import__("mistral_common").__file__).parent / "data" / "tokenizer.model.v1"


def make_hf_model(kind: str, folder: str | Path, seed: int = 0, dtype=torch.float32,
                  max_shard_size: str | None = None, **config) -> Path:
    """Save a tiny random HF model of ``kind`` (norm weights randomised too) to ``folder``;
    ``config`` overrides config fields (e.g. ``vocab_size``)."""
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    fields = {**HF_SHAPES, **KINDS[kind], **config}
    if kind == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**fields))
    else:
        model = MistralForCausalLM(MistralConfig(**fields))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    model = model.to(dtype)
    folder = Path(folder)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    (folder / "tokenizer.model").write_bytes(TOKENIZER.read_bytes())
    return folder


def read_all(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF folder's safetensors files, read by safetensors itself."""
    from safetensors import safe_open

    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_bit_exact(source, exported) -> None:
    a, b = read_all(source), read_all(exported)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def tokens(vocab: int, batch: int = 2, seq: int = TOKENS_SEQ) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def hf_logits(folder: str | Path, toks: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(toks).logits.float()


def megatron_logits(model_cfg, parallel, ckpt: str | Path, toks: torch.Tensor) -> torch.Tensor:
    """fp32 logits [b, s, v] of checkpoint ``ckpt`` loaded at ``parallel`` (parallel state already
    initialised for it), on every rank: the last pipeline stage has them (vocab-parallel, gathered
    across TP, cut to the real vocabulary: padded ids dropped) and broadcasts them to the other
    stages."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from clinmega.config import PrecisionConfig, RuntimeConfig
    from clinmega.models import build_model
    from clinmega.models.dist_ckpt import load_model_weights
    from clinmega.models.vocab import real_vocab_logits

    (model,) = build_model(model_cfg, parallel, PrecisionConfig(dtype="fp32"), RuntimeConfig())
    load_model_weights([model], ckpt)
    model.eval()
    positions = torch.arange(toks.shape[1]).repeat(toks.shape[0], 1)
    with torch.no_grad():
        if not ps.is_pipeline_first_stage(ignore_virtual=True):  # PP: hidden states by hand
            hidden = torch.empty(toks.shape[1], toks.shape[0], model_cfg.hidden_size)
            dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(toks, positions, None)
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            dist.send(out.contiguous(), ps.get_pipeline_model_parallel_next_rank())
            out = torch.empty(*toks.shape, model_cfg.vocab_size)
        else:
            out = real_vocab_logits(model, gather_from_tensor_model_parallel_region(out))
            out = out.contiguous()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(out, ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return out.float()


# --- the 2-rank cases (one spawned group runs them all: tests/case_table.py) --------------------
# The group's folder is the test's conversion root: <root>/<kind>/hf (the HF model), <kind>/tp1 (its
# single-process import) and reference_logits.pt ({kind: HF logits}), written before the spawn.
TABLE = CaseTable(__name__)
REFERENCE_LOGITS = "reference_logits.pt"


def logits_diff(root: Path, kind: str, parallel, ckpt: Path) -> float:
    """max |megatron - HF| logits of ``ckpt`` loaded at ``parallel`` on both ranks."""
    from clinmega.config import RuntimeConfig
    from clinmega.conversion.checkpoint_info import hf_model_config
    from clinmega.runtime import init_model_parallel

    cfg = hf_model_config(root / kind / "hf")
    init_model_parallel(parallel, RuntimeConfig())
    logits = megatron_logits(cfg, parallel, ckpt, tokens(cfg.vocab_size))
    return (logits - torch.load(root / REFERENCE_LOGITS)[kind]).abs().max().item()


def load_case(tmp: Path, kind: str, **layout) -> float:
    """The single-process (TP1-written) import loaded at ``layout`` on 2 ranks."""
    from clinmega.config import ParallelConfig

    return logits_diff(tmp.parent, kind, ParallelConfig(**layout), tmp.parent / kind / "tp1")


def import_case(tmp: Path, kind: str, **layout) -> float:
    """An import written by 2 ranks at ``layout`` (into this case's folder), loaded at TP1."""
    from clinmega.config import ParallelConfig
    from clinmega.conversion import import_hf

    import_hf(tmp.parent / kind / "hf", tmp / "mcore", ParallelConfig(**layout), progress=False)
    return logits_diff(tmp.parent, kind, ParallelConfig(), tmp / "mcore")


@TABLE.case
def mistral_v01_load_tp2(tmp: Path) -> float:
    return load_case(tmp, "mistral-v0.1", tensor_parallel=2)


@TABLE.case
def mistral_v01_load_pp2(tmp: Path) -> float:
    return load_case(tmp, "mistral-v0.1", pipeline_parallel=2)


@TABLE.case
def mistral_v03_load_tp2(tmp: Path) -> float:
    return load_case(tmp, "mistral-v0.3", tensor_parallel=2)


@TABLE.case
def mixtral_load_ep2(tmp: Path) -> float:
    return load_case(tmp, "mixtral", expert_parallel=2)


@TABLE.case
def mixtral_load_tp2_sp(tmp: Path) -> float:
    return load_case(tmp, "mixtral", tensor_parallel=2, sequence_parallel=True)


@TABLE.case
def mistral_v01_import_tp2(tmp: Path) -> float:
    return import_case(tmp, "mistral-v0.1", tensor_parallel=2)


@TABLE.case
def mixtral_import_ep2(tmp: Path) -> float:
    return import_case(tmp, "mixtral", expert_parallel=2)


@TABLE.case
def mistral_v01_resave_tp2(tmp: Path) -> str:
    """The mistral-v0.1 import resharded to TP2 and saved again (the test exports it)."""
    from clinmega.config import ParallelConfig, PrecisionConfig, RuntimeConfig
    from clinmega.conversion.checkpoint_info import hf_model_config
    from clinmega.models import build_model
    from clinmega.models.dist_ckpt import load_model_weights, save_model_weights
    from clinmega.runtime import init_model_parallel

    root, tp2 = tmp.parent, ParallelConfig(tensor_parallel=2)
    init_model_parallel(tp2, RuntimeConfig())
    chunks = build_model(hf_model_config(root / "mistral-v0.1" / "hf"), tp2,
                         PrecisionConfig(dtype="fp32"), RuntimeConfig())
    load_model_weights(chunks, root / "mistral-v0.1" / "tp1")
    save_model_weights(chunks, tmp / "mcore")
    return str(tmp / "mcore")
