"""Corpus files as they come: BOM, truncated/corrupt .gz/.zst/.xz, damaged Parquet, ShareGPT/Alpaca layouts.

Every case builds the bad file, runs the real stage, and checks that every good document was written
token-exact against the ``sentencepiece`` / ``mistral-common`` encodings of the source text (never against
our own storage), that the break is recorded in the manifest, and that the other files finish.
"""

import gzip
import json
import lzma
import random
import zlib

import pytest
import zstandard
from data_utils import random_text, sp_reference, write_jsonl

from clinmega.cli import main
from clinmega.data.config import DecontamConfig, PretrainPrepConfig, SFTPrepConfig
from clinmega.data.decontam import decontaminate
from clinmega.data.pretrain import prepare_pretrain
from clinmega.data.readers import DamagedInputError, iter_lines, plan_chunks
from clinmega.data.sft import prepare_sft

BOM = b"\xef\xbb\xbf"


def _texts(n, seed):
    rng = random.Random(seed)
    return [random_text(rng, rng.randrange(5, 120)) for _ in range(n)]


def _lines(texts, key="text"):
    return [json.dumps({key: t}, ensure_ascii=False).encode() + b"\n" for t in texts]


def _read_all(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    out = [ds[i].tolist() for i in range(len(ds))]
    del ds
    return out


def _expected(texts):
    sp = sp_reference("mistral-v1")
    return [[sp.bos_id(), *ids, sp.eos_id()] for ids in sp.encode(texts)]


def _compress(fmt, data):
    if fmt == "gz":
        return gzip.compress(data)
    if fmt == "xz":
        return lzma.compress(data)
    return zstandard.ZstdCompressor().compress(data)


def _reference_decompress(fmt, blob):
    """What the format's own library decodes from a truncated file (the bytes before the cut)."""
    if fmt == "gz":
        return zlib.decompressobj(wbits=31).decompress(blob)
    if fmt == "xz":
        return lzma.LZMADecompressor().decompress(blob)
    return zstandard.ZstdDecompressor().decompressobj().decompress(blob)


def _corrupt_after(fmt, head, tail):
    """A file whose first ``head`` bytes decode cleanly and that is corrupt right after them.

    gzip: one member, a full flush after ``head`` (byte-aligned, the dictionary reset), then the next
    deflate block header overwritten with an invalid block type: one decoder call sees the whole file
    and raises, so only the salvage pass recovers ``head``. zstd/xz: ``head`` in a first frame/stream,
    the second one's header garbled."""
    if fmt == "gz":
        c = zlib.compressobj(wbits=31)
        first = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
        rest = bytearray(c.compress(tail) + c.flush())
        rest[:16] = b"\xff" * 16
        return first + bytes(rest)
    second = bytearray(_compress(fmt, tail))
    second[4:24] = b"\xa5" * 20
    return _compress(fmt, head) + bytes(second)


def test_bom_is_not_part_of_the_first_line(tmp_path):
    texts = _texts(30, 1)
    plain = b"".join(_lines(texts[:10]))
    (tmp_path / "a.jsonl").write_bytes(BOM + plain)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(BOM + b"".join(_lines(texts[10:20]))))
    (tmp_path / "c.json.zst").write_bytes(_compress("zst", BOM + b"".join(_lines(texts[20:]))))
    m = prepare_pretrain(PretrainPrepConfig(
        inputs=[str(tmp_path / n) for n in ("a.jsonl", "b.jsonl.gz", "c.json.zst")],
        output_prefix=str(tmp_path / "out"), workers=1, chunk_mb=0.0001, progress=False))
    assert m["totals"]["documents_skipped"] == 0, m["files"]
    assert _read_all(tmp_path / "out") == _expected(texts)
    # a BOM inside the file (not at its start) is still data: that line is malformed JSON
    (tmp_path / "d.jsonl").write_bytes(plain + BOM + plain[: plain.index(b"\n") + 1])
    chunk = plan_chunks([tmp_path / "d.jsonl"], 1)[0]
    assert list(iter_lines(chunk))[-1].startswith(BOM)


@pytest.mark.parametrize("fmt", ["gz", "zst", "xz"])
@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_compressed_file_keeps_every_document_before_the_break(tmp_path, fmt, damage):
    good1, bad, good2 = _texts(20, 2), _texts(900, 3), _texts(25, 4)  # zstd: > 2 blocks of 128 KiB
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in good1])
    data = b"".join(_lines(bad))
    if damage == "truncated":
        full = _compress(fmt, data)
        blob = full[: len(full) * 11 // 20]
        kept = _reference_decompress(fmt, blob).count(b"\n")
    else:
        kept = 120
        blob = _corrupt_after(fmt, b"".join(_lines(bad[:kept])), b"".join(_lines(bad[kept:])))
    (tmp_path / f"b.jsonl.{fmt}").write_bytes(blob)
    (tmp_path / "c.jsonl.zst").write_bytes(_compress("zst", b"".join(_lines(good2))))
    assert 0 < kept < len(bad)
    inputs = [str(tmp_path / n) for n in ("a.jsonl", f"b.jsonl.{fmt}", "c.jsonl.zst")]

    m = prepare_pretrain(PretrainPrepConfig(inputs=inputs, output_prefix=str(tmp_path / "out"), workers=2,
                                            chunk_mb=0.001, progress=False))
    assert _read_all(tmp_path / "out") == _expected(good1 + bad[:kept] + good2)
    broken = m["files"][1]
    assert broken["documents_written"] == kept and broken["documents_skipped"] == 0
    assert [(d["line"], d["kind"]) for d in broken["damaged"]] == [(kept + 1, damage)]
    assert broken["damaged"][0]["reason"]
    assert [f["damaged"] for f in (m["files"][0], m["files"][2])] == [[], []]
    assert m["totals"]["files_damaged"] == 1

    with pytest.raises(DamagedInputError):  # a reader without a damage list raises, naming file:line
        list(iter_lines(plan_chunks([tmp_path / f"b.jsonl.{fmt}"], 1)[0]))


def test_cli_summary_line_and_strict_exit(tmp_path, capsys):
    texts = _texts(40, 5)
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    full = gzip.compress(b"".join(_lines(texts)))
    (tmp_path / "b.jsonl.gz").write_bytes(full[: len(full) // 2])
    args = ["prepare", "pretrain", "--inputs", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz"),
            "--workers", "1", "--no-progress"]
    assert main([*args, "--output-prefix", str(tmp_path / "lenient")]) == 0
    err = capsys.readouterr().err.splitlines()
    summary = [line for line in err if line.startswith("damaged input:")]
    assert len(summary) == 1 and "1 of 2 file(s)" in summary[0] and "b.jsonl.gz:" in summary[0]
    assert main([*args, "--output-prefix", str(tmp_path / "strict"), "--strict"]) == 2
    assert "damaged input: 1 of 2" in capsys.readouterr().err
    # strict fails the run but the data before the break is there, and marked
    lenient = json.loads((tmp_path / "lenient.manifest.json").read_text())
    strict = json.loads((tmp_path / "strict.manifest.json").read_text())
    assert strict["files"] == lenient["files"] and strict["files"][1]["damaged"]
    assert _read_all(tmp_path / "strict") == _read_all(tmp_path / "lenient")


def _column_chunk_span(path, group):
    import pyarrow.parquet as pq

    col = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = col.dictionary_page_offset or col.data_page_offset
    return start, col.total_compressed_size


def test_damaged_parquet_row_group_and_footer(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = _texts(160, 6)
    texts[101] = "   "  # an `empty` skip after the damaged group: its row number must stay absolute
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=40, write_page_checksum=True,
                   use_dictionary=False)
    start, size = _column_chunk_span(path, 1)
    blob = bytearray(path.read_bytes())
    mid = start + size // 2
    blob[mid : mid + 32] = bytes(b ^ 0x5A for b in blob[mid : mid + 32])
    path.write_bytes(bytes(blob))
    footer = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": ["never read"]}), footer)
    footer.write_bytes(footer.read_bytes()[:-12])
    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts[:5]])

    m = prepare_pretrain(PretrainPrepConfig(inputs=[str(path), str(footer), str(tmp_path / "c.jsonl")],
                                            output_prefix=str(tmp_path / "out"), workers=2, chunk_mb=0.0001,
                                            progress=False))
    good = [t for i, t in enumerate(texts) if not 40 <= i < 80 and i != 101]
    assert _read_all(tmp_path / "out") == _expected(good + texts[:5])
    a, b, c = m["files"]
    assert [(d["line"], d["row_group"], d["rows_lost"]) for d in a["damaged"]] == [(41, 1, 40)]
    assert a["examples"] == [{"line": 102, "reason": "empty", "detail": "'text' is blank"}]
    assert a["documents_read"] == 120 and a["documents_written"] == 119
    assert [(d["line"], d["kind"]) for d in b["damaged"]] == [(1, "corrupt")] and b["documents_read"] == 0
    assert c["documents_written"] == 5 and m["totals"]["files_damaged"] == 2


# --- prepare sft: layouts, and a damaged chat file ------------------------------------------------

def _mistral_common_tokens(messages, name="mistral-v3"):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from clinmega.data.tokenizers import mistral_common_model_path

    mt = MistralTokenizer.from_file(str(mistral_common_model_path(name)), mode=ValidationMode.finetuning)
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    req = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return mt.encode_chat_completion(req).tokens


def test_sft_sharegpt_and_alpaca_layouts_token_exact(tmp_path):
    rng = random.Random(7)

    def say(tag):
        return f"{tag} " + random_text(rng, rng.randrange(3, 30)).strip()

    sharegpt, expected = [], []
    for i in range(12):
        turns = [{"from": "system", "value": say("sys")}] if i % 3 == 0 else []
        for _ in range(1 + i % 3):
            turns += [{"from": "human", "value": say("q")}, {"from": "gpt", "value": say("a")}]
        sharegpt.append({"conversations": turns, "id": i})
        role = {"system": "system", "human": "user", "gpt": "assistant"}
        expected.append([{"role": role[t["from"]], "content": t["value"]} for t in turns])
    sharegpt.append({"conversations": [{"from": "bot", "value": "x"}]})  # unknown role: skipped, named
    alpaca = []
    for i in range(10):
        rec = {"instruction": say("do"), "input": say("ctx") if i % 2 else "", "output": say("out")}
        alpaca.append(rec)
        user = rec["instruction"] + ("\n\n" + rec["input"] if rec["input"] else "")
        expected.append([{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}])
    write_jsonl(tmp_path / "sharegpt.jsonl", sharegpt)
    (tmp_path / "alpaca.json").write_bytes(BOM + b"".join(json.dumps(r).encode() + b"\n" for r in alpaca))
    msgs = [{"messages": e} for e in expected[:4]]
    chat = b"".join(json.dumps(r).encode() + b"\n" for r in msgs)
    (tmp_path / "messages.jsonl.xz").write_bytes(_compress("xz", chat)[:-60])  # truncated

    m = prepare_sft(SFTPrepConfig(inputs=[str(tmp_path / n) for n in ("sharegpt.jsonl", "alpaca.json",
                                                                        "messages.jsonl.xz")],
                                  output_dir=str(tmp_path / "sft"), tokenizer="mistral-v3", seq_length=4096,
                                  pack=False, workers=1, progress=False))
    s, a, z = m["files"]
    assert s["layouts"] == {"sharegpt": 13} and s["skipped"] == {"invalid_conversation": 1}
    assert "'bot'" in s["examples"][0]["detail"]
    assert a["layouts"] == {"alpaca": 10} and a["documents_written"] == 10
    kept = _reference_decompress("xz", (tmp_path / "messages.jsonl.xz").read_bytes()).count(b"\n")
    assert 0 < kept < 4
    assert z["layouts"] == {"messages": kept} and z["damaged"][0]["line"] == kept + 1
    written = _read_all(tmp_path / "sft" / "tokens")
    assert written == [_mistral_common_tokens(e) for e in expected[:22] + expected[:kept]]


# --- decontaminate ------------------------------------------------------------------------------

def test_decontaminate_damaged_xz_keeps_lines_before_the_break_and_writes_xz(tmp_path):
    rng = random.Random(8)
    question = " ".join(f"ev{rng.randrange(10_000)}" for _ in range(30))
    write_jsonl(tmp_path / "eval.jsonl", [{"question": question, "options": {"A": "x"}}])
    lines = _lines([random_text(rng, 40) for _ in range(200)])
    lines[10] = json.dumps({"text": "intro " + question + " outro"}).encode() + b"\n"
    full = lzma.compress(BOM + b"".join(lines))
    (tmp_path / "train.jsonl.xz").write_bytes(full[: len(full) * 3 // 5])
    kept = lzma.LZMADecompressor().decompress((tmp_path / "train.jsonl.xz").read_bytes()).count(b"\n")
    m = decontaminate(DecontamConfig(inputs=[str(tmp_path / "train.jsonl.xz")],
                                     eval_sets=[str(tmp_path / "eval.jsonl")], output_dir=str(tmp_path / "clean"),
                                     workers=1, progress=False))
    assert m["documents_flagged"] == 1 and m["files"][0]["damaged"][0]["line"] == kept + 1
    out = lzma.decompress((tmp_path / "clean" / "train.jsonl.xz").read_bytes())
    assert out == b"".join(lines[:10] + lines[11:kept])
