"""A packed SFT bin with the block-diagonal mask gives the same per-token loss as running each sample
alone, through a tiny megatron-core GPTModel on CPU (clinmega.runtime / clinmega.models)."""

import random

import pytest
import torch
from data_utils import write_jsonl

from clinmega.data.config import SFTPrepConfig
from clinmega.data.packing import block_causal_mask
from clinmega.data.sft import prepare_sft
from clinmega.data.sft_dataset import SFTDataset
from clinmega.training.data import collate, packed_attention_mask


@pytest.fixture()
def tiny_model():
    import torch.distributed as dist

    from clinmega.config import ParallelConfig, PrecisionConfig, RuntimeConfig
    from clinmega.models import build_model, get_preset
    from clinmega.runtime import initialize, shutdown

    runtime = RuntimeConfig(seed=1234)
    initialize(ParallelConfig(), runtime)
    # v0.2: no sliding window, so the mask is purely block-diagonal causal; vocab = mistral-v1's
    (model,) = build_model(get_preset("tiny-mistral-v0.2"), ParallelConfig(), PrecisionConfig(dtype="fp32"), runtime)
    model.eval()
    yield model
    shutdown()
    if dist.is_initialized():
        dist.destroy_process_group()


S = 160


def _per_token_loss(model, tokens, position_ids, mask, labels):
    with torch.no_grad():
        return model(input_ids=tokens, position_ids=position_ids, attention_mask=mask, labels=labels.clamp(min=0))


def test_packed_equals_unpacked_per_token_loss(tmp_path, tiny_model):
    rng = random.Random(0)
    records = []
    for i in range(12):
        msgs = []
        for t in range(1 + i % 3):
            msgs.append({"role": "user", "content": f"Case {i}.{t}: " + "fever cough " * rng.randrange(1, 4)})
            msgs.append({"role": "assistant", "content": "Consider pneumonia; " * rng.randrange(1, 3)})
        records.append({"messages": msgs})
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    prepare_sft(
        SFTPrepConfig(
            inputs=[str(path)],
            output_dir=str(tmp_path / "sft"),
            tokenizer="mistral-v1",
            seq_length=S,
            workers=1,
            progress=False,
        )
    )
    ds = SFTDataset(tmp_path / "sft")
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
