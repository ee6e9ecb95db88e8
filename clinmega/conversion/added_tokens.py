"""``import-hf --add-tokens``: extend the source model's tokenizer before CPT/SFT.

The tokens are added to the source folder's Hugging Face tokenizer with transformers'
``add_tokens`` (matched as whole strings wherever they occur in a text, before the subword
model runs), so their ids are ``len(tokenizer), len(tokenizer) + 1, ...`` in the order given;
tokens already in the vocabulary are skipped (adding one would change how every text containing
that string is split). The import then gives the model ``vocab_size = len(extended tokenizer)``
rows, initialises the new embedding and output rows to the mean of the existing ones
(``clinmega.conversion.mapping.VocabRows``) and saves the extended tokenizer with
``save_pretrained`` into the checkpoint's ``hf_assets/`` folder, which export copies next to the
weights, so the exported folder is a model + tokenizer pair that transformers loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from clinmega.conversion.errors import ConversionError


def parse_tokens(spec: str) -> list[str]:
    """Tokens from ``FILE`` (one per line, blank lines ignored, the line without its newline is the
    token) or from a comma-separated list."""
    path = Path(spec)
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ConversionError(f"{path}: cannot read the tokens file: {err}") from None
        tokens = [line for line in lines if line.strip()]
        where = str(path)
    else:
        tokens = [t for t in spec.split(",") if t.strip()]
        where = f"--add-tokens {spec!r}"
    if not tokens:
        raise ConversionError(f"{where}: no tokens to add")
    return tokens


@dataclass
class ExtendedTokenizer:
    tokenizer: Any
    source_vocab_size: int
    added: dict[str, int] = field(default_factory=dict)       # token -> new id
    already_present: dict[str, int] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def record(self) -> dict:
        """What the checkpoint's conversion record says about the vocabulary."""
        return {"source_vocab_size": self.source_vocab_size, "vocab_size": self.vocab_size,
                "added_tokens": self.added, "already_present": self.already_present,
                "new_rows_init": "mean of the source model's rows (embedding and output layer)"}


def extend_tokenizer(hf_dir: str | Path, tokens: Sequence[str], special_tokens: Sequence[str],
                     model_vocab_size: int) -> ExtendedTokenizer:
    """The tokenizer of ``hf_dir`` with ``tokens`` (and ``special_tokens``, which decoding with
    ``skip_special_tokens`` drops) added; the model's vocabulary must be the tokenizer's."""
    from transformers import AutoTokenizer

    hf_dir = Path(hf_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    except Exception as err:  # transformers raises many kinds for a missing/broken tokenizer
        raise ConversionError(f"{hf_dir}: cannot load the Hugging Face tokenizer to extend: "
                              f"{err}") from None
    if len(tokenizer) != model_vocab_size:
        raise ConversionError(
            f"{hf_dir}: the tokenizer has {len(tokenizer)} tokens but config.json vocab_size is "
            f"{model_vocab_size}; --add-tokens needs them equal (new ids start after both)")
    out = ExtendedTokenizer(tokenizer, model_vocab_size)
    vocab = tokenizer.get_vocab()
    for group, special in ((tokens, False), (special_tokens, True)):
        new = []
        for token in group:
            if token in vocab:
                out.already_present[token] = vocab[token]
            elif token not in new:
                new.append(token)
        if new:
            tokenizer.add_tokens(new, special_tokens=special)
            vocab = tokenizer.get_vocab()
            out.added.update({t: vocab[t] for t in new})
    expected = list(range(model_vocab_size, model_vocab_size + len(out.added)))
    if sorted(out.added.values()) != expected or len(tokenizer) != model_vocab_size + len(expected):
        raise ConversionError(f"{hf_dir}: the added tokens got ids {sorted(out.added.values())} "
                              f"(tokenizer size {len(tokenizer)}), expected ids {expected}")
    return out
