"""A packed SFT bin with the block-diagonal mask gives the same per-token loss as running each sample
alone, through a tiny megatron-core GPTModel on CPU (clinmega.runtime / clinmega.models): through
``training.data.collate`` on a model without sliding window, and through the training path
(``training.data.collate`` -> ``step.forward_step`` -> ``step.lm_loss``) on the v0.1 shape (sliding
window 8) against each sample run alone with megatron-core's own causal + window mask."""

import random

import pytest
import torch
from data_utils import write_jsonl

from clinmega.data.config import SFTPrepConfig
from clinmega.data.packing import block_causal_mask
from clinmega.data.sft import prepare_sft
from clinmega.data.sft_dataset import SFTDataset
from clinmega.training.data import collate, packed_attention_mask


def _model(preset: str):
    import torch.distributed as dist

    from clinmega.config import ParallelConfig, PrecisionConfig, RuntimeConfig
    from clinmega.models import build_model, get_preset
    from clinmega.runtime import initialize, shutdown

    runtime = RuntimeConfig(seed=1234)
    initialize(ParallelConfig(), runtime)
    (model,) = build_model(get_preset(preset), ParallelConfig(), PrecisionConfig(dtype="fp32"), runtime)
    model.eval()
    yield model
    shutdown()
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture()
def tiny_model():
    # v0.2: no sliding window, so the mask is purely block-diagonal causal; vocab = mistral-v1's
    yield from _model("tiny-mistral-v0.2")


@pytest.fixture()
def tiny_v01_model():
    # v0.1: sliding window 8 (megatron window_size (7, 0)); samples below are longer than that
    yield from _model("tiny-mistral-v0.1")


S = 160


def _sft_bins(tmp_path) -> SFTDataset:
    rng = random.Random(0)
    records = []
    for i in range(12):
        msgs = []
        for t in range(1 + i % 3):
            msgs.append({"role": "user", "content": f"Case {i}.{t}: " + "fever cough " * rng.randrange(1, 4)})
            msgs.append({"role": "assistant", "content": "Consider pneumonia; " * rng.randrange(1, 3)})
        records.append({"messages": msgs})
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    prepare_sft(SFTPrepConfig(inputs=[str(path)], output_dir=str(tmp_path / "sft"), tokenizer="mistral-v1",
                              seq_length=S, workers=1, progress=False))
    return SFTDataset(tmp_path / "sft")


def _per_token_loss(model, tokens, position_ids, mask, labels):
    with torch.no_grad():
        return model(input_ids=tokens, position_ids=position_ids, attention_mask=mask, labels=labels.clamp(min=0))


def test_packed_equals_unpacked_per_token_loss(tmp_path, tiny_model):
    ds = _sft_bins(tmp_path)
    multi = [b for b in range(len(ds)) if ds.bin_offsets[b + 1] - ds.bin_offsets[b] >= 3]
    assert multi, "expected bins holding several samples"
    checked = 0
    for b in multi[:2]:
        batch = collate([ds[b]])
        batch["attention_mask"] = packed_attention_mask(batch["cu_seqlens"], S)
        packed = _per_token_loss(
            tiny_model, batch["tokens"], batch["position_ids"], batch["attention_mask"], batch["labels"]
        )[0]
        cu = ds[b]["cu_seqlens"].tolist()
        for k, i in enumerate(ds.sample_ids[ds.bin_offsets[b] : ds.bin_offsets[b + 1]]):
            start, end = cu[k], cu[k + 1]
            item = ds[b]
            n = end - start
            tokens = item["tokens"][start:end][None]
            labels = item["labels"][start:end][None]
            alone = _per_token_loss(tiny_model, tokens, torch.arange(n)[None], block_causal_mask([0, n], n), labels)[0]
            lm = item["loss_mask"][start:end] > 0
            assert lm.any()
            diff = (packed[start:end][lm] - alone[lm]).abs().max().item()
            assert diff <= 1e-5, f"bin {b} sample {int(i)}: max per-token loss diff {diff}"
            checked += 1
    assert checked >= 6
    # the mask matters: without it, later samples in a bin see earlier ones and the loss changes
    b = multi[0]
    batch = collate([ds[b]])
    batch["attention_mask"] = packed_attention_mask(batch["cu_seqlens"], S)
    causal = block_causal_mask([0, S], S)
    leaky = _per_token_loss(tiny_model, batch["tokens"], batch["position_ids"], causal, batch["labels"])[0]
    packed = _per_token_loss(
        tiny_model, batch["tokens"], batch["position_ids"], batch["attention_mask"], batch["labels"]
    )[0]
    later = batch["loss_mask"][0].bool() & (torch.arange(S) >= ds[b]["cu_seqlens"][1])
    assert (leaky[later] - packed[later]).abs().max().item() > 1e-3


def test_training_path_packed_equals_each_sample_alone_with_sliding_window(tmp_path, tiny_v01_model):
    """A real SFT bin through the path training uses (collate -> forward_step -> lm_loss) on a
    sliding-window model: each sample's per-token loss equals that sample run alone with
    ``attention_mask=None`` (megatron-core's own causal/window mask), and lm_loss's sum and count
    are those of the samples."""
    from clinmega.training.data import collate
    from clinmega.training.step import forward_step

    model = tiny_v01_model
    window = model.config.window_size[0] + 1
    ds = _sft_bins(tmp_path)
    bins = [b for b in range(len(ds)) if ds.bin_offsets[b + 1] - ds.bin_offsets[b] >= 3][:2]
    assert len(bins) == 2, "expected bins holding several samples"
    items = [ds[b] for b in bins]
    with torch.no_grad():
        packed, loss_func = forward_step(iter([collate(items)]), model)
        loss_sum, num_tokens, _ = loss_func(packed)
    total, count, longest = 0.0, 0, 0
    for row, item in enumerate(items):
        cu = item["cu_seqlens"].tolist()
        for start, end in zip(cu[:-1], cu[1:]):
            lm = item["loss_mask"][start:end] > 0
            if not lm.any():
                assert end == S  # only the padding tail has no loss
                continue
            n = end - start
            longest = max(longest, int(torch.nonzero(lm)[-1]) + 1)
            with torch.no_grad():
                alone = model(item["tokens"][None, start:end], torch.arange(n)[None], None,
                              labels=item["labels"][None, start:end])[0]
            diff = (packed[row, start:end][lm] - alone[lm]).abs().max().item()
            assert diff <= 1e-5, f"bin {bins[row]} sample at {start}: max per-token loss diff {diff}"
            total += alone[lm].sum().item()
            count += int(lm.sum())
    assert longest > 2 * window  # answers far beyond the window: the window really matters
    assert int(num_tokens) == count
    assert abs(loss_sum.item() - total) <= 1e-4 * count
