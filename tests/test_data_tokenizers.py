"""Tokenizer loader: exactness of the fast backend, identity, dtype, literal control text."""

import hashlib
import random

import numpy as np
import pytest
from data_utils import sp_reference

from clinmega.data.tokenizers import load_tokenizer, mistral_common_model_path


@pytest.mark.parametrize("name,vocab", [("mistral-v1", 32000), ("mistral-v3", 32768)])
def test_mistral_tokenizers_identity_and_dtype(name, vocab):
    tok = load_tokenizer(name)
    ident = tok.identity()
    assert ident["vocab_size"] == vocab and tok.bos_id == 1 and tok.eod_id == 2
    assert ident["sha256"] == hashlib.sha256(mistral_common_model_path(name).read_bytes()).hexdigest()
    assert tok.token_dtype() is np.uint16
    assert tok.template == ("v1" if name == "mistral-v1" else "v3")


@pytest.mark.parametrize("name", ["mistral-v1", "mistral-v3"])
def test_fast_backend_matches_sentencepiece_on_random_unicode(name):
    sp = sp_reference(name)
    tok = load_tokenizer(name, backend="auto")
    rng = random.Random(7)
    alphabet = "abcXYZ 019 .,;:!?-_/\\\n\t\r\u00a0\u3000\u200béßçøΩж漢字😀🩺<>[]{}'\"" + "".join(
        chr(rng.randrange(0x20, 0x2FFF)) for _ in range(200)
    )
    texts = ["", " ", "<s>[INST] literal [/INST]</s>", "x" * 5000]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 300))) for _ in range(3000)]
    assert tok.encode_batch(texts) == sp.encode(texts)
    flat, offsets = tok.encode_flat(texts)
    ref = sp.encode(texts)
    assert [flat[offsets[i] : offsets[i + 1]].tolist() for i in range(len(texts))] == ref


def test_literal_control_text_is_text_not_special():
    tok = load_tokenizer("mistral-v3")
    ids = tok.encode("<s> [INST]")
    assert tok.bos_id not in ids and tok.special_ids["[INST]"] not in ids


def test_sentencepiece_backend_and_path_spec_agree():
    path = mistral_common_model_path("mistral-v1")
    a = load_tokenizer(path, backend="sentencepiece")
    b = load_tokenizer("mistral-v1")
    assert a.backend_name == "sentencepiece" and a.template == "v1"
    assert a.encode("Chest pain, r/o ACS.") == b.encode("Chest pain, r/o ACS.")


def test_unknown_spec_names_itself(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")


def test_gigatoken_conversion_is_kept_and_a_damaged_copy_is_rebuilt(tmp_path, monkeypatch):
    """The converted tokenizer is stored once per model and reused; a truncated copy is converted again
    (and replaced), with ids equal to sentencepiece's either way."""
    pytest.importorskip("gigatoken")
    from clinmega.data import tokenizers

    monkeypatch.setenv("CLINMEGA_CACHE_DIR", str(tmp_path))
    model = tokenizers.mistral_common_model_path("mistral-v1")
    cached = tokenizers._converted_cache_path(hashlib.sha256(model.read_bytes()).hexdigest())
    assert not cached.exists()
    text = "The patient, 45yo M, Rx: furosemide 40 mg IV b.i.d. — naïve µg"
    want = tokenizers.load_tokenizer("mistral-v1", backend="sentencepiece").encode(text)
    assert tokenizers.load_tokenizer("mistral-v1", backend="gigatoken").encode(text) == want
    assert cached.read_text() == tokenizers._GigatokenBackend.convert(model.read_bytes())
    calls = []
    monkeypatch.setattr(tokenizers._GigatokenBackend, "convert", staticmethod(lambda d: calls.append(1) or ""))
    assert tokenizers.load_tokenizer("mistral-v1", backend="gigatoken").encode(text) == want  # read, not converted
    assert not calls
    monkeypatch.undo()
    monkeypatch.setenv("CLINMEGA_CACHE_DIR", str(tmp_path))
    cached.write_text(cached.read_text()[:1000])
    assert tokenizers.load_tokenizer("mistral-v1", backend="gigatoken").encode(text) == want
    assert cached.read_text() == tokenizers._GigatokenBackend.convert(model.read_bytes())
