"""prepare sft: Mistral templates token-exact vs mistral-common, assistant-only loss, packing, dataset."""

import functools
import json
import random

import numpy as np
import pytest
import torch
from data_utils import write_jsonl

from clinmega.data.config import SFTPrepConfig
from clinmega.data.packing import (
    block_causal_mask,
    pack_ffd,
    packing_report,
    position_ids_from_cu_seqlens,
)
from clinmega.data.sft import ConversationError, make_template, prepare_sft, to_messages
from clinmega.data.sft_dataset import IGNORE_INDEX, SFTDataset
from clinmega.training.data import collate, packed_attention_mask, thd_batch
from clinmega.data.tokenizers import load_tokenizer, mistral_common_model_path

CONVERSATION = [
    {"role": "system", "content": "You are a careful clinical assistant."},
    {"role": "user", "content": "A 67-year-old man has crushing chest pain. First test?"},
    {"role": "assistant", "content": "A 12-lead ECG within 10 minutes.  "},
    {"role": "user", "content": "ST elevation in II, III, aVF. Which artery?"},
    {"role": "assistant", "content": "Usually the right coronary artery (RCA)."},
    {"role": "user", "content": "<s>[INST] literal tags stay text [/INST]"},
    {"role": "assistant", "content": "Noted: </s> is only text here."},
]


@functools.cache
def _tokenizer(name):
    return load_tokenizer(name)


@functools.cache
def _mistral_tokenizer(name):
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(mistral_common_model_path(name)), mode=ValidationMode.finetuning)


def _mistral_common(name, messages):
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    mt = _mistral_tokenizer(name)
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    req = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return mt, mt.encode_chat_completion(req).tokens


@pytest.mark.parametrize("name", ["mistral-v1", "mistral-v3"])
@pytest.mark.parametrize("n_messages", [3, 5, 7])
def test_template_token_exact_and_loss_only_on_assistant(name, n_messages):
    messages = CONVERSATION[:n_messages]
    tok = _tokenizer(name)
    ids, mask = make_template("auto", tok).encode(messages)
    mt, reference = _mistral_common(name, messages)
    assert ids == reference
    # the masked-in tokens are exactly each assistant turn as mistral-common encodes it, + EOS
    inner = mt.instruct_tokenizer
    expected_spans = [
        inner.encode_assistant_message(_assistant(m), False) for m in messages if m["role"] == "assistant"
    ]
    ids_arr, mask_arr = np.array(ids), np.array(mask)
    spans = np.split(ids_arr, np.flatnonzero(np.diff(mask_arr)) + 1)
    kept = [s.tolist() for s, first in zip(spans, _span_starts(mask_arr)) if mask_arr[first] == 1]
    assert kept == expected_spans
    assert mask_arr.sum() == sum(map(len, expected_spans))


def _assistant(m):
    from mistral_common.protocol.instruct.messages import AssistantMessage

    return AssistantMessage(content=m["content"])


def _span_starts(mask):
    return [0, *(np.flatnonzero(np.diff(mask)) + 1).tolist()]


def test_input_output_pairs_and_validation_errors():
    cfg = SFTPrepConfig()
    msgs = to_messages({"instruction": "Answer briefly.", "input": "Dose?", "output": "5 mg", "system": "S"}, cfg)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[1]["content"] == "Answer briefly.\n\nDose?"
    for record, reason in [
        ({"messages": [{"role": "user", "content": "q"}]}, "invalid_conversation"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}, "invalid_conversation"),
        ({"messages": [{"role": "doctor", "content": "q"}]}, "invalid_conversation"),
        ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]}, "empty"),
        ({"messages": "hi"}, "wrong_type"),
        ({"prompt": "x"}, "missing_field"),
    ]:
        with pytest.raises(ConversationError) as err:
            to_messages(record, cfg)
        assert err.value.reason == reason


def _chat_file(tmp_path, n=120, seed=0):
    rng = random.Random(seed)
    records = []
    for i in range(n):
        msgs = [{"role": "system", "content": "Be precise."}] if i % 4 == 0 else []
        for t in range(1 + i % 3):
            msgs.append({"role": "user", "content": f"Q{i}.{t} " + "symptom " * rng.randrange(1, 40)})
            msgs.append({"role": "assistant", "content": f"A{i}.{t} " + "answer " * rng.randrange(1, 60)})
        records.append({"messages": msgs})
    records.append({"input": "What is 2+2?", "output": "4"})
    return write_jsonl(tmp_path / "chat.jsonl", records, raw_lines={3: b"{broken\n", 7: b'{"messages": []}\n'})


def test_prepare_sft_end_to_end_dataset_contract(tmp_path):
    path = _chat_file(tmp_path)
    m = prepare_sft(
        SFTPrepConfig(
            inputs=[str(path)],
            output_dir=str(tmp_path / "sft"),
            tokenizer="mistral-v3",
            seq_length=256,
            workers=2,
            chunk_mb=0.005,
            progress=False,
        )
    )
    assert m["files"][0]["skipped"] == {"malformed_json": 1, "empty": 1}
    assert {(e["line"], e["reason"]) for e in m["files"][0]["examples"]} == {(4, "malformed_json"), (8, "empty")}
    assert m["template"] == "mistral-v3" and m["packing"]["efficiency"] > m["packing"]["unpacked_efficiency"]
    ds = SFTDataset(tmp_path / "sft")
    assert ds.num_samples == m["totals"]["documents_written"] == 121
    seen = []
    for b in range(len(ds)):
        item = ds[b]
        S = 256
        assert all(item[k].shape == (S,) for k in ("tokens", "labels", "loss_mask", "position_ids"))
        cu = item["cu_seqlens"]
        assert cu[0] == 0 and cu[-1] == S and (cu[1:] > cu[:-1]).all()
        assert torch.equal(item["position_ids"], position_ids_from_cu_seqlens(cu, S))
        assert ((item["labels"] == IGNORE_INDEX) == (item["loss_mask"] == 0)).all()
        for i in ds.sample_ids[ds.bin_offsets[b] : ds.bin_offsets[b + 1]]:
            seen.append(int(i))
        # each sub-sequence: inputs t[:-1], targets t[1:], positions 0..n-1
        start = 0
        for k, i in enumerate(ds.sample_ids[ds.bin_offsets[b] : ds.bin_offsets[b + 1]]):
            ids, mask = ds.sample(int(i))
            n = len(ids) - 1
            assert int(cu[k + 1]) - int(cu[k]) == n
            assert item["tokens"][start : start + n].tolist() == ids[:-1].tolist()
            lab = np.where(mask[1:] > 0, ids[1:], IGNORE_INDEX)
            assert item["labels"][start : start + n].tolist() == lab.tolist()
            start += n
    assert sorted(seen) == list(range(ds.num_samples))
    # the stored samples are the source records as mistral-common encodes them (in input order)
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("messages") or "input" in record:
            records.append(record["messages"] if "messages" in record else [
                {"role": "user", "content": record["input"]}, {"role": "assistant", "content": record["output"]}])
    assert len(records) == ds.num_samples
    whole = 0
    for i, messages in enumerate(records):
        _, reference = _mistral_common("mistral-v3", messages)
        ids, mask = ds.sample(i)
        assert len(ids) <= 256 + 1, i
        if len(reference) > 256 + 1:  # truncated to the bin (test_truncation_policy checks how)
            assert ids.tolist()[:2] == reference[:2], i
            continue
        whole += 1
        assert ids.tolist() == reference, i
        assert mask.sum() == sum(len(_mistral_tokenizer("mistral-v3").instruct_tokenizer.encode_assistant_message(
            _assistant(m), False)) for m in messages if m["role"] == "assistant"), i
    assert whole >= 60
    batch = collate([ds[0], ds[1]])
    assert batch["tokens"].shape == (2, 256)
    assert packed_attention_mask(batch["cu_seqlens"], 256).shape == (2, 1, 256, 256)
    thd = thd_batch(batch)["packed_seq_params"]
    assert thd.cu_seqlens_q[-1] == 512 and thd.cu_seqlens_q.dtype == torch.int32


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_truncation_policy(tmp_path, policy):
    long_user = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    long_answer = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 300}]}
    path = write_jsonl(tmp_path / "c.jsonl", [long_user, long_answer])
    m = prepare_sft(
        SFTPrepConfig(
            inputs=[str(path)],
            output_dir=str(tmp_path / "o"),
            seq_length=64,
            truncation=policy,
            workers=1,
            progress=False,
        )
    )
    skipped = m["files"][0]["skipped"]
    if policy == "drop":
        assert skipped == {"too_long": 2}
    else:  # the long prompt leaves no assistant token; the long answer is cut to seq_length + 1
        assert skipped == {"no_loss_tokens": 1} and m["truncated_samples"] == 1
        ds = SFTDataset(tmp_path / "o")
        ids, mask = ds.sample(0)
        assert len(ids) == 65 and mask[-1] == 1


def _naive_ffd(lengths, cap):
    bins = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b in bins:
            if b[0] + lengths[i] <= cap:
                b[0] += lengths[i]
                b[1].append(i)
                break
        else:
            bins.append([lengths[i], [i]])
    return [b[1] for b in bins]


def test_pack_ffd_matches_naive_first_fit_decreasing():
    rng = np.random.default_rng(0)
    for cap in (64, 1000):
        lengths = rng.integers(1, cap + 1, size=700)
        offsets, ids = pack_ffd(lengths, cap)
        got = [ids[offsets[b] : offsets[b + 1]].tolist() for b in range(len(offsets) - 1)]
        assert got == _naive_ffd(lengths.tolist(), cap)
        assert max(lengths[g].sum() for g in got) <= cap
        rep = packing_report(lengths, offsets, cap)
        assert rep["efficiency"] == pytest.approx(lengths.sum() / (len(got) * cap), abs=1e-6)
    with pytest.raises(ValueError, match="sample 1"):
        pack_ffd(np.array([3, 9]), 8)


def test_block_causal_mask_is_block_diagonal_causal():
    cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    mask = block_causal_mask(cu, 8)
    assert mask.shape == (1, 1, 8, 8) and mask.dtype == torch.bool
    seg = [0, 0, 0, 1, 2, 2, 2, 2]
    expected = torch.tensor([[not (seg[i] == seg[j] and j <= i) for j in range(8)] for i in range(8)])
    assert torch.equal(mask[0, 0], expected)
    assert position_ids_from_cu_seqlens(cu, 8).tolist() == [0, 1, 2, 0, 0, 1, 2, 3]


def test_chat_template_path_with_hf_tokenizer(tmp_path):
    import shutil

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    shutil.copy(mistral_common_model_path("mistral-v1"), hf_dir / "tokenizer.model")
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}\n"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    (hf_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": False,
                "add_eos_token": False,
                "chat_template": template,
                "legacy": False,
            }
        )
    )
    tok = load_tokenizer(hf_dir)
    assert tok.kind == "huggingface" and tok.eod_id == 2
    msgs = [{"role": "user", "content": "Dose?"}, {"role": "assistant", "content": "5 mg"}]
    with pytest.raises(ConversationError, match="prefix-stable"):  # generation prompt is not in the full render
        make_template("auto", tok).encode(msgs)
    (hf_dir / "tokenizer_config.json").write_text(
        (hf_dir / "tokenizer_config.json").read_text().replace("<|assistant|>", "")
    )
    tok = load_tokenizer(hf_dir)
    ids, mask = make_template("chat-template", tok).encode(msgs)
    assert ids == tok.hf.apply_chat_template(msgs, tokenize=True, return_dict=False)
    assert tok.hf.decode([i for i, k in zip(ids, mask) if k]) == "5 mg</s>"


def test_failed_sft_run_leaves_no_output_dir(tmp_path, monkeypatch):
    from clinmega.data import sft

    path = _chat_file(tmp_path, n=20)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sft, "pack_ffd", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_sft(SFTPrepConfig(inputs=[str(path)], output_dir=str(tmp_path / "o"), workers=1, progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl"]
