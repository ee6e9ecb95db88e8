"""The orjson fast path yields exactly the records of readers.iter_records (json module), line for line."""

from clinmega.data.fastjson import iter_texts
from clinmega.data.readers import iter_records, plan_chunks

LINES = [
    b'{"text": "plain"}\n',
    b'\xef\xbb\xbf{"text": "after a BOM"}\n',
    b'{"text": "lone \\ud800 surrogate"}\n',
    b'{"text": "pair \\ud83d\\ude00 ok", "x": NaN}\n',
    b'{"text": 123456789012345678901234567890}\n',
    b'{"text": 1.5}\n',
    b'{"text": null}\n',
    b'{"text": ["a"]}\n',
    b'{"text": "   \\n\\t"}\n',
    b'{"text": ""}\n',
    b'{"other": "x"}\n',
    b'["text"]\n',
    b'"text"\n',
    b"\n",
    b"   \r\n",
    b'{"text": "bad json"\n',
    b'{"text": "\xff\xfe"}\n',
    b'{"meta": {"text": "nested"}, "text": "top"}\n',
    b'{"meta": "str", "text": "t"}\n',
    b'{"text": "dup", "text": "last wins"}\n',
    b'{"text": "caf\xc3\xa9 \\u00e9 \xe4\xb8\xad"}\n',
    b'{"text": "no newline at end"}',
]


def test_fast_path_records_equal_iter_records(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"".join(LINES))
    for field in ("text", "meta.text"):
        for chunk in plan_chunks([path], 3, 0.00005):  # several byte-range chunks
            assert list(iter_texts(chunk, field)) == list(iter_records(chunk, field))
    (chunk,) = plan_chunks([path], 1, 64)
    records = list(iter_texts(chunk, "text"))
    assert len(records) == len(LINES)
    assert sum(r.reason is None for r in records) >= 6
