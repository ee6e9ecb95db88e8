"""Packed batches in Transformer Engine's THD layout (``thd_batch``) and the step's choice of route:
THD on the TE spec, the dense block mask on the local spec. TE itself needs CUDA; the layout is
checked here against megatron-core's own GPTModel on CPU (same per-token loss as the ``[b, S]``
block-mask batch), the TE forward by ``benchmarks/gpu_check.py``."""

from types import SimpleNamespace

import pytest
import torch

from clinmega.config import ParallelConfig, PrecisionConfig, RuntimeConfig
from clinmega.data.packing import block_causal_mask
from clinmega.training.data import (
    IGNORE_INDEX,
    SyntheticSource,
    collate,
    thd_alignment,
    thd_batch,
)
from clinmega.training.step import forward_step

# two rows of S=10: row 0 = samples of 3 and 5 + a padding tail of 2; row 1 = one full sample
CU = [torch.tensor([0, 3, 8, 10], dtype=torch.int32), torch.tensor([0, 10], dtype=torch.int32)]


def _batch():
    tokens = torch.arange(20).view(2, 10) + 100
    labels = tokens + 1000
    loss_mask = torch.ones(2, 10)
    loss_mask[0, 8:] = 0
    labels[0, 8:] = IGNORE_INDEX
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1], list(range(10))])
    return dict(tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=positions,
                cu_seqlens=CU)


def test_thd_without_padding_is_the_flattened_batch():
    out = thd_batch(_batch(), multiple=1)
    p = out["packed_seq_params"]
    assert p.qkv_format == "thd"
    assert p.cu_seqlens_q.tolist() == [0, 3, 8, 10, 20] == p.cu_seqlens_q_padded.tolist()
    assert p.cu_seqlens_kv.tolist() == p.cu_seqlens_q.tolist() and p.cu_seqlens_q.dtype == torch.int32
    assert p.max_seqlen_q == p.max_seqlen_kv == 10
    b = _batch()
    assert torch.equal(out["tokens"], b["tokens"].reshape(1, -1))
    assert torch.equal(out["labels"], b["labels"].reshape(1, -1))
    assert torch.equal(out["loss_mask"], b["loss_mask"].reshape(1, -1))
    assert torch.equal(out["position_ids"], b["position_ids"].reshape(1, -1))
    assert "cu_seqlens" not in out and "attention_mask" not in out


def test_thd_pads_every_subsequence_to_the_multiple():
    b = _batch()
    out = thd_batch(b, multiple=4, pad_id=7)
    p = out["packed_seq_params"]
    assert p.cu_seqlens_q.tolist() == [0, 3, 8, 10, 20]            # real lengths 3, 5, 2, 10
    assert p.cu_seqlens_q_padded.tolist() == [0, 4, 12, 16, 28]     # padded to 4, 8, 4, 12
    assert p.max_seqlen_q == 12 and out["tokens"].shape == (1, 28)
    assert out["position_ids"][0].tolist() == [0, 1, 2, 3, *range(8), 0, 1, 2, 3, *range(12)]
    idx = out["thd_index"]
    real = idx >= 0
    assert idx[real].tolist() == list(range(20))  # every real token once, in order
    for key in ("tokens", "labels", "loss_mask"):
        assert torch.equal(out[key][0, real], b[key].reshape(-1)), key
    assert set(out["tokens"][0, ~real].tolist()) == {7}
    assert set(out["labels"][0, ~real].tolist()) == {IGNORE_INDEX}
    assert out["loss_mask"][0, ~real].sum() == 0 and out["loss_mask"].sum() == b["loss_mask"].sum()


def test_thd_maps_the_neftune_scale_and_rejects_bad_boundaries():
    b = _batch()
    b["neftune"] = dict(scale=torch.arange(20.0).view(2, 10) + 1, seed=[1, 2, 3, 4])
    out = thd_batch(b, multiple=4)
    scale, idx = out["neftune"]["scale"], out["thd_index"]
    assert scale.shape == (1, 28) and out["neftune"]["seed"] == [1, 2, 3, 4]
    assert torch.equal(scale[0, idx >= 0], b["neftune"]["scale"].reshape(-1))
    assert scale[0, idx < 0].sum() == 0
    b["cu_seqlens"] = [torch.tensor([0, 3, 9]), CU[1]]
    with pytest.raises(ValueError, match=r"row 0: cu_seqlens \[0, 3, 9\]"):
        thd_batch(b)


@pytest.mark.parametrize("tp, sp, cp, fp8, multiple", [
    (1, False, 1, False, 1), (4, False, 1, False, 1), (4, True, 1, False, 4),
    (2, True, 2, False, 8), (8, True, 1, True, 16), (1, False, 1, True, 16), (32, True, 1, True, 32)])
def test_thd_alignment(tp, sp, cp, fp8, multiple):
    assert thd_alignment(tp, sp, cp, fp8) == multiple


@pytest.fixture(scope="module")
def tiny_gpt():
    from clinmega.models import build_model, get_preset
    from clinmega.runtime import initialize

    initialize(ParallelConfig(), RuntimeConfig(seed=3))
    cfg = get_preset("tiny-mistral-v0.1", num_layers=2)  # sliding window 8 < bin length
    (model,) = build_model(cfg, ParallelConfig(), PrecisionConfig("fp32"))
    return model.eval(), cfg


def test_thd_layout_gives_the_same_loss_through_megatron_gptmodel(tiny_gpt):
    """The THD row (padded boundaries, pad slots) run through megatron-core's GPTModel with the
    block mask of its padded boundaries gives every real token the loss of the [b, S] batch.
    Also the local spec's own packed route under a sliding window: megatron-core's softmax drops
    an explicit mask when a window is set (cpu_compat's window_mask patch), and the rows of the
    flattened batch would then see the rows before them."""
    model, cfg = tiny_gpt
    S = 24
    src = SyntheticSource(8, S, cfg.vocab_size, seed=5, packed=True)
    batch = collate([src[i] for i in range(3)])
    assert max(len(cu) for cu in batch["cu_seqlens"]) >= 4  # several samples in a bin
    window = cfg.sliding_window
    labels = lambda t: t.clamp(min=0)  # noqa: E731
    with torch.no_grad():
        mask = torch.cat([block_causal_mask(cu, S, window) for cu in batch["cu_seqlens"]])
        ref = model(batch["tokens"], batch["position_ids"], mask, labels=labels(batch["labels"]))
        thd = thd_batch(batch, multiple=8)
        T = thd["tokens"].shape[1]
        assert T % 8 == 0 and T > 3 * S
        p = thd["packed_seq_params"]
        got = model(thd["tokens"], thd["position_ids"],
                    block_causal_mask(p.cu_seqlens_q_padded, T, window),
                    labels=labels(thd["labels"]))
    real = thd["thd_index"] >= 0
    on = batch["loss_mask"].reshape(-1) > 0
    assert torch.allclose(got[0, real][on], ref.reshape(-1)[on], atol=1e-5)
    # and the layout matters: pad slots moved to the end of the row shift tokens across boundaries
    shifted = thd["tokens"].clone()
    shifted[0, : int(real.sum())] = thd["tokens"][0, real]
    with torch.no_grad():
        wrong = model(shifted, thd["position_ids"], block_causal_mask(p.cu_seqlens_q_padded, T, window),
                      labels=labels(thd["labels"]))
    assert not torch.allclose(wrong[0, real][on], ref.reshape(-1)[on], atol=1e-3)


class _Recorder(torch.nn.Module):
    """Stands in for a GPTModel: records what the step passes (TE cannot run on CPU)."""

    def __init__(self, impl: str, tp: int = 2, sp: bool = True, pre_process: bool = True):
        super().__init__()
        self.config = SimpleNamespace(transformer_impl=impl, tensor_model_parallel_size=tp,
                                      sequence_parallel=sp, context_parallel_size=1, fp8=None,
                                      window_size=(3, 0))
        self.pre_process, self.calls = pre_process, []

    def forward(self, tokens, position_ids, attention_mask, labels=None, packed_seq_params=None):
        self.calls.append(dict(tokens=tokens, position_ids=position_ids, mask=attention_mask,
                               packed=packed_seq_params))
        return torch.zeros(tokens.shape)


@pytest.mark.parametrize("pre_process", [True, False])  # False: a middle/last pipeline stage
def test_step_uses_thd_exactly_on_the_te_spec(pre_process):
    from clinmega.runtime import cpu_compat

    cpu_compat.apply()  # the local route's block mask under a sliding window needs it on CPU
    te, local = _Recorder("transformer_engine", pre_process=pre_process), _Recorder("local")
    _, loss_fn = forward_step(iter([_batch()]), te)
    [call] = te.calls
    p = call["packed"]
    assert call["mask"] is None and p is not None and p.qkv_format == "thd"
    assert p.cu_seqlens_q_padded.tolist() == [0, 4, 10, 12, 22]  # SP over TP=2: multiples of 2
    assert call["tokens"].shape == (1, 22)
    loss_sum, count, _ = loss_fn(torch.ones(1, 22))
    assert count == 18 and loss_sum == 18  # the loss mask came along: same tokens counted
    forward_step(iter([_batch()]), local)
    [call] = local.calls
    assert call["packed"] is None and call["tokens"].shape == (2, 10)
    assert torch.equal(call["mask"], torch.cat([block_causal_mask(cu, 10, 4) for cu in CU]))
    unpacked = {k: v for k, v in _batch().items() if k != "cu_seqlens"}
    forward_step(iter([unpacked]), te)
    assert te.calls[-1]["packed"] is None and te.calls[-1]["mask"] is None
