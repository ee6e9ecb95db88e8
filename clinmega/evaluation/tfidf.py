"""TF-IDF nearest neighbours for kNN few-shot exemplar selection (``selection: knn`` strategies)."""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")


def _terms(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class TfidfIndex:
    """TF-IDF vectors of the train texts (raw counts x smooth idf, L2-normalised, like scikit-learn's
    ``TfidfVectorizer(token_pattern=r"[a-z0-9]+")`` defaults) and cosine-similarity ranking."""

    def __init__(self, texts: Sequence[str]):
        self.vocab: dict[str, int] = {}
        rows, cols, counts = [], [], []
        for r, text in enumerate(texts):
            for term, count in Counter(_terms(text)).items():
                rows.append(r)
                cols.append(self.vocab.setdefault(term, len(self.vocab)))
                counts.append(count)
        self.n_docs = len(texts)
        self.rows, self.cols = np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64)
        df = np.bincount(self.cols, minlength=len(self.vocab))
        self.idf = np.log((1 + self.n_docs) / (1 + df)) + 1.0
        weights = np.array(counts, dtype=np.float64) * self.idf[self.cols]
        norms = np.sqrt(np.bincount(self.rows, weights=weights**2, minlength=self.n_docs))
        self.weights = weights / np.where(norms > 0, norms, 1.0)[self.rows]

    def query_vector(self, text: str) -> np.ndarray:
        q = np.zeros(len(self.vocab))
        for term, count in Counter(_terms(text)).items():
            if term in self.vocab:
                q[self.vocab[term]] = count * self.idf[self.vocab[term]]
        norm = np.linalg.norm(q)
        return q / norm if norm > 0 else q

    def similarities(self, text: str) -> np.ndarray:
        q = self.query_vector(text)
        return np.bincount(self.rows, weights=self.weights * q[self.cols], minlength=self.n_docs)

    def ranking(self, text: str) -> list[int]:
        """Train indices, most similar first (ties: lower index first)."""
        sims = self.similarities(text)
        return np.lexsort((np.arange(self.n_docs), -sims)).tolist()
