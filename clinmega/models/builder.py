"""ModelConfig + ParallelConfig + PrecisionConfig -> megatron-core TransformerConfig and GPTModel.

One function per step, used by every stage (training, conversion, evaluation):

* :func:`transformer_config` – the TransformerConfig (fusions on only where kernels exist),
* :func:`build_model_chunk` – one GPTModel for a (virtual) pipeline stage,
* :func:`build_model` – the list of chunks this rank holds (one per virtual stage).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from clinmega.config.errors import ConfigError
from clinmega.config.schema import ModelConfig, ParallelConfig, PrecisionConfig, RuntimeConfig
from clinmega.models.layout import check_layout
from clinmega.models.spec import decoder_block_spec, resolve_transformer_impl
from clinmega.models.vocab import install_padded_vocab_mask

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def fused_wgrad_available() -> bool:
    """Whether megatron-core's ``gradient_accumulation_fusion`` kernel imports: apex's
    ``fused_weight_gradient_mlp_cuda``, the flag ``tensor_parallel.layers`` itself checks (its
    ColumnParallelLinear, the LM head under either spec, raises at build time when the fusion is
    on without it; TE's own linears do not need apex). Logged once either way."""
    from megatron.core.tensor_parallel import layers

    found = bool(layers._grad_accum_fusion_available)
    log.info("gradient_accumulation_fusion: %s", "on (apex fused_weight_gradient_mlp_cuda)" if found
             else "off (apex's fused_weight_gradient_mlp_cuda does not import)")
    return found


def transformer_config(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig,
                       runtime: RuntimeConfig | None = None, training: bool = True,
                       **overrides) -> TransformerConfig:
    """The megatron-core TransformerConfig for this model, layout and precision.

    ``overrides`` are passed through to TransformerConfig (e.g. activation recompute settings
    from the training config). ``training=False``: a model for evaluation only (see
    :func:`clinmega.models.layout.check_layout`).
    """
    runtime = runtime or RuntimeConfig()
    check_layout(model, parallel, training)
    impl = resolve_transformer_impl(runtime.transformer_impl)
    te = impl == "transformer_engine"
    on_gpu = torch.cuda.is_available()
    if parallel.context_parallel > 1 and not te:
        raise ConfigError("parallel.context_parallel: context parallelism needs Transformer Engine "
                          "attention (megatron-core's local DotProductAttention has none)")
    if precision.fp8 and not te:
        raise ConfigError(
            "precision.fp8: FP8 needs Transformer Engine on a GPU that supports it (Hopper or "
            "newer); install clinmega[gpu] and set runtime.transformer_impl to 'auto' or "
            "'transformer_engine', or set precision.fp8 to null")
    dtype = DTYPES[precision.dtype]
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        activation_func=F.silu,
        gated_linear_unit=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        # HF Mistral/Mixtral: sliding_window=W attends to W keys (itself + W-1 before).
        window_size=(model.sliding_window - 1, 0) if model.sliding_window else None,
        params_dtype=dtype,
        bf16=precision.dtype == "bf16",
        fp16=precision.dtype == "fp16",
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        **parallel.megatron_sizes(),
        sequence_parallel=parallel.sequence_parallel,
        transformer_impl=impl,
        # CPU: build the full weight on CPU and slice it, so every layout starts from the same
        # full tensors for a given seed; GPU: megatron's per-rank init on the device.
        use_cpu_initialization=not on_gpu,
        # Fused kernels exist only on GPU (TE / apex / torch.compile'd jit kernels).
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu and te,
        apply_rope_fusion=te,
        gradient_accumulation_fusion=fused_wgrad_available() if on_gpu else False,
        persist_layer_norm=False,
        # Interleaved (virtual) pipelining batches isend/irecv with the same peer (PP=2: prev ==
        # next); gloo matches those by posting order and swapped activations with gradients of
        # the same shape (a wrong loss, no error). Separate p2p calls are correct on gloo.
        batch_p2p_comm=on_gpu,
    )
    if model.is_moe:
        kwargs.update(
            num_moe_experts=model.num_experts,
            moe_ffn_hidden_size=model.ffn_hidden_size,
            moe_router_topk=model.moe_router_topk,
            moe_aux_loss_coeff=model.moe_aux_loss_coeff,
            moe_router_load_balancing_type="aux_loss",
            moe_router_pre_softmax=False,  # Mixtral: softmax over the top-k logits
            moe_token_dispatcher_type=parallel.moe_token_dispatcher,
            moe_grouped_gemm=te,
        )
    if precision.fp8:
        kwargs.update(fp8=precision.fp8, fp8_recipe=precision.fp8_recipe,
                      fp8_amax_history_len=precision.fp8_amax_history_len,
                      fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
                      fp8_param=precision.fp8_param_gather)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_model_chunk(model: ModelConfig, config: TransformerConfig, pre_process: bool = True,
                      post_process: bool = True, vp_stage: int | None = None,
                      pp_rank: int | None = None) -> GPTModel:
    """One GPTModel (the layers of one pipeline/virtual stage) on this rank's device.

    Its embedding and output layer have ``model.padded_vocab_size(TP)`` rows; the logits of the
    padded ids are -inf (``clinmega.models.vocab``), so the model computes the same function as with
    exactly ``model.vocab_size`` rows."""
    spec = decoder_block_spec(config, config.transformer_impl, vp_stage=vp_stage, pp_rank=pp_rank)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=model.padded_vocab_size(config.tensor_model_parallel_size),
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=int(model.rope_theta),
        vp_stage=vp_stage,
    )
    install_padded_vocab_mask(gpt, model.vocab_size)
    # A model built under ``torch.device("meta")`` (shapes only, e.g. checkpoint conversion)
    # stays there: meta tensors cannot be copied to a device.
    if torch.cuda.is_available() and not any(p.is_meta for p in gpt.parameters()):
        gpt.cuda(torch.cuda.current_device())
    return gpt


def build_model(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig,
                runtime: RuntimeConfig | None = None, training: bool = True, **overrides) -> list[GPTModel]:
    """The model chunks of this rank (one per virtual pipeline stage), after
    :func:`clinmega.runtime.initialize` has set up the parallel state (``training=False``: for
    evaluation only, see :func:`transformer_config`)."""
    from megatron.core import parallel_state as ps

    config = transformer_config(model, parallel, precision, runtime, training, **overrides)
    vpp = parallel.virtual_pipeline_parallel or 1
    chunks = []
    for vp_stage in range(vpp):
        stage = vp_stage if parallel.virtual_pipeline_parallel else None
        chunks.append(build_model_chunk(
            model, config,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage))
    return chunks
