"""One tokenizer abstraction for every data stage.

``load_tokenizer(spec)`` accepts:

* ``mistral-v1`` / ``mistral-v3``: the Mistral SentencePiece models shipped inside the installed
  ``mistral-common`` wheel (32,000 / 32,768 pieces);
* a path to a SentencePiece ``.model`` file (any file name: Mistral's end in ``.model.vN``);
* a path to a Hugging Face tokenizer directory (``tokenizer.json`` and/or ``tokenizer.model`` +
  ``tokenizer_config.json``), loaded with ``transformers.AutoTokenizer``.

SentencePiece models are encoded by the ``gigatoken`` Rust backend when it is installed and agrees
token-for-token with the ``sentencepiece`` library on a probe set (checked at load time); otherwise by
``sentencepiece`` itself. Control pieces (``<s>``, ``[INST]``...) written literally in text are
tokenized as text, exactly like ``sentencepiece`` and ``mistral-common`` do: special ids are only
ever inserted by code (BOS/EOD/templates), never parsed from data.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from clinmega.utils.atomic import write_text_atomic
from clinmega.utils.user_cache import user_cache_dir

MISTRAL_SHORTHANDS = {
    "mistral-v1": "tokenizer.model.v1",
    "mistral-v3": "mistral_instruct_tokenizer_240323.model.v3",
}

_TEMPLATE_OF_VERSION = {"v1": "v1", "v2": "v3", "v3": "v3"}

# Strings that exercise normalisation, whitespace, byte fallback and literal control-piece text.
_PROBE_TEXTS = (
    "",
    " ",
    "  two  spaces\n\nnew\tline\r\n",
    "Hello world",
    " leading space and trailing   ",
    "<s> literal </s> [INST] x [/INST] <unk> <0x0A>",
    "émoji 😀 中文 日本語 ﬁ ① \u00a0nbsp \u200bzw \u3000ideographic",
    "The patient, 45yo M, presented w/ CHF; BNP=1200 pg/mL (ref <100). Rx: furosemide 40 mg IV b.i.d.",
    "def f(x):\n    return x**2  # code\n",
    "Q: Which drug? A) aspirin B) heparin\nAnswer: B",
)


class _Backend(Protocol):
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]: ...


def _lists_to_flat(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(concatenated ids as int64, offsets with len(ids)+1 entries starting at 0)."""
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)), out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(offsets[-1]))
    return flat, offsets


class _ListBackend:
    """Backends whose native output is Python lists get ``encode_flat`` by conversion."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return _lists_to_flat(self.encode_batch(texts))


def _sha256(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _converted_cache_path(sha256: str) -> Path:
    """Where the gigatoken conversion of the SentencePiece model with this sha256 is kept (``user_cache_dir``)."""
    from importlib.metadata import version

    return user_cache_dir() / "tokenizers" / f"gigatoken-{version('gigatoken')}-{sha256[:32]}.json"


def mistral_common_model_path(shorthand: str) -> Path:
    """Path of a tokenizer model file shipped inside the installed ``mistral-common`` package."""
    from importlib.util import find_spec

    if shorthand not in MISTRAL_SHORTHANDS:
        raise ValueError(f"unknown tokenizer shorthand {shorthand!r}; known: {sorted(MISTRAL_SHORTHANDS)}")
    spec = find_spec("mistral_common")  # its location only: importing it costs start-up time
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{shorthand}: the mistral-common package is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / MISTRAL_SHORTHANDS[shorthand]
    if not path.is_file():
        raise FileNotFoundError(f"{shorthand}: expected {path} inside the installed mistral-common package")
    return path


class _SentencePieceBackend(_ListBackend):
    def __init__(self, model_path: Path) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))


class _GigatokenBackend:
    """gigatoken's SentencePiece-BPE port with the control pieces removed from its added-token table
    (so literal ``<s>`` in text stays text, as in ``sentencepiece``)."""

    def __init__(self, data: bytes, sha256: str) -> None:
        """``data``: the SentencePiece model's bytes; ``sha256``: their digest (names the kept conversion)."""
        import gigatoken

        cached = _converted_cache_path(sha256)
        try:  # the conversion is pure Python (~0.5 s a start): its result is kept per model and version
            self.tok = gigatoken.Tokenizer.from_json(cached.read_text(encoding="utf-8"))
            return
        except Exception:  # absent, unreadable or damaged (the probe texts check the result in any case)
            pass
        text = self.convert(data)
        self.tok = gigatoken.Tokenizer.from_json(text)
        with contextlib.suppress(OSError):
            write_text_atomic(cached, text)

    @staticmethod
    def convert(data: bytes) -> str:
        """The tokenizer JSON gigatoken loads for the SentencePiece model ``data``, control pieces removed."""
        from gigatoken._load.sentencepiece import sentencepiece_to_tokenizer_json

        spec = json.loads(sentencepiece_to_tokenizer_json(data))
        spec["added_tokens"] = []
        return json.dumps(spec)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # Sequential in-process: parallelism comes from our worker processes, not rayon threads.
        return self.tok.encode_batch_list(list(texts), parallel=False)

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        layout = self.tok.encode_batch(list(texts), parallel=False).layout
        offsets = np.asarray(layout.offsets.data, dtype=np.int64)
        flat = np.asarray(layout.content.data)[offsets[0] : offsets[-1]]
        return flat, offsets - offsets[0]


class _HFBackend(_ListBackend):
    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.hf(list(texts), add_special_tokens=False)["input_ids"]


@dataclass
class Tokenizer:
    """A loaded tokenizer: encoding plus the ids the data stages need.

    ``eod_id`` is appended after every pretraining document and ends every assistant turn
    (it is the model's EOS). ``hf`` holds the ``transformers`` tokenizer for HF specs (used for
    ``apply_chat_template``), else None. ``special_ids`` maps control/added tokens (``[INST]``) to ids.
    ``template`` names the Mistral instruct template version
    (``v1``/``v3``) when the tokenizer is a Mistral SentencePiece model, else None.
    """

    name: str
    kind: str  # "sentencepiece" | "huggingface"
    backend_name: str  # "gigatoken" | "sentencepiece" | "transformers"
    files: tuple[Path, ...]
    vocab_size: int
    bos_id: int | None
    eod_id: int
    backend: _Backend
    special_ids: dict[str, int] = field(default_factory=dict)  # control / special token -> id
    hf: Any = None
    template: str | None = None
    _sha: str | None = None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS."""
        return self.backend.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS."""
        return self.backend.encode_batch(texts)

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids concatenated, and offsets (``len(texts)+1``, from 0): text i is
        ``flat[offsets[i]:offsets[i+1]]``. The fast path for bulk tokenization."""
        return self.backend.encode_flat(texts)

    def identity(self) -> dict[str, Any]:
        """What a manifest records to say exactly which tokenizer produced the ids."""
        if self._sha is None:
            self._sha = _sha256(self.files)
        return {
            "name": self.name,
            "kind": self.kind,
            "backend": self.backend_name,
            "files": [str(p) for p in self.files],
            "sha256": self._sha,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eod_id": self.eod_id,
        }

    def token_dtype(self) -> type[np.number]:
        """Smallest dtype megatron-core uses for ids of this vocabulary (uint16 below 65,500)."""
        from clinmega.data.indexed import optimal_dtype

        return optimal_dtype(self.vocab_size)


def _load_sentencepiece(name: str, path: Path, backend: str) -> Tokenizer:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    reference = _SentencePieceBackend(path)
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()  # the tokenizer's identity, and the name of its kept conversion
    chosen: _Backend = reference
    chosen_name = "sentencepiece"
    if backend in ("auto", "gigatoken"):
        try:
            fast = _GigatokenBackend(data, sha)
        except ImportError:
            if backend == "gigatoken":
                raise
            fast = None
        except Exception as exc:  # unsupported model type (e.g. unigram) -> exact fallback
            if backend == "gigatoken":
                raise ValueError(f"{path}: gigatoken cannot load this SentencePiece model: {exc}") from exc
            fast = None
        if fast is not None:
            if fast.encode_batch(_PROBE_TEXTS) == reference.encode_batch(_PROBE_TEXTS):
                chosen, chosen_name = fast, "gigatoken"
            elif backend == "gigatoken":
                raise ValueError(f"{path}: gigatoken disagrees with sentencepiece on the probe texts")
            else:
                warnings.warn(f"{path}: gigatoken disagrees with sentencepiece; using sentencepiece", stacklevel=2)
    elif backend != "sentencepiece":
        raise ValueError(f"unknown backend {backend!r} for a SentencePiece model (auto|gigatoken|sentencepiece)")
    # Mistral names the instruct-format version in the file suffix (".model.v1", ".model.v3");
    # v2 and v3 format plain chats identically; later versions (v7: [SYSTEM_PROMPT]) are not supported.
    version = re.search(r"\.model\.(v\d+)$", path.name)
    template = _TEMPLATE_OF_VERSION.get(version.group(1)) if version else None
    if sp.eos_id() < 0:
        raise ValueError(f"{path}: SentencePiece model has no EOS piece; cannot mark end of document")
    return Tokenizer(
        name=name,
        kind="sentencepiece",
        backend_name=chosen_name,
        files=(path,),
        vocab_size=sp.get_piece_size(),
        bos_id=sp.bos_id() if sp.bos_id() >= 0 else None,
        eod_id=sp.eos_id(),
        backend=chosen,
        special_ids={sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.IsControl(i)},
        template=template,
        _sha=sha,
    )


def _load_hf(path: Path) -> Tokenizer:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path))
    if hf.eos_token_id is None:
        raise ValueError(f"{path}: Hugging Face tokenizer has no eos_token; cannot mark end of document")
    files = tuple(
        sorted(p for p in path.iterdir() if p.name.startswith("tokenizer") or p.name == "special_tokens_map.json")
    )
    return Tokenizer(
        name=str(path),
        kind="huggingface",
        backend_name="transformers",
        files=files,
        vocab_size=len(hf),
        bos_id=hf.bos_token_id,
        eod_id=hf.eos_token_id,
        backend=_HFBackend(hf),
        special_ids={t: i for t, i in hf.get_added_vocab().items()},
        hf=hf,
    )


def load_tokenizer(spec: str | os.PathLike[str], backend: str = "auto") -> Tokenizer:
    """Load a tokenizer from a shorthand (``mistral-v1``/``mistral-v3``), a SentencePiece model file or
    a Hugging Face tokenizer directory. ``backend`` (SentencePiece only): ``auto`` (gigatoken when exact,
    else sentencepiece), ``gigatoken`` or ``sentencepiece``."""
    spec_str = os.fspath(spec)
    if spec_str in MISTRAL_SHORTHANDS:
        return _load_sentencepiece(spec_str, mistral_common_model_path(spec_str), backend)
    path = Path(spec_str).expanduser()
    if path.is_dir():
        return _load_hf(path)
    if path.is_file():
        return _load_sentencepiece(str(path), path, backend)
    raise FileNotFoundError(
        f"tokenizer {spec_str!r}: not a known shorthand ({', '.join(MISTRAL_SHORTHANDS)}), "
        "SentencePiece model file, or Hugging Face tokenizer directory"
    )


_TOKENIZERS: dict[tuple[str, str], Tokenizer] = {}


def cached_tokenizer(spec: str, backend: str) -> Tokenizer:
    """``load_tokenizer`` once per process (forked workers inherit the parent's instance)."""
    key = (spec, backend)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(spec, backend)
    return _TOKENIZERS[key]
