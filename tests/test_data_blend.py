"""Blends through megatron-core's BlendedMegatronDatasetBuilder: proportions, seeds, epochs report."""

import random

import numpy as np
import pytest
from data_utils import random_text, write_jsonl

from clinmega.data.blend import build_blend
from clinmega.data.config import BlendConfig, BlendSource, PretrainPrepConfig
from clinmega.data.pretrain import prepare_pretrain


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    rng = random.Random(0)
    out = {}
    for name, n in (("clinical", 900), ("general", 500)):
        path = write_jsonl(root / f"{name}.jsonl", [{"text": f"{name} " + random_text(rng, 60)} for _ in range(n)])
        prepare_pretrain(
            PretrainPrepConfig(inputs=[str(path)], output_prefix=str(root / name), workers=1, progress=False)
        )
        out[name] = str(root / name)
    out["cache"] = str(root / "cache")
    return out


def _cfg(paths, **kw):
    base = dict(seq_length=64, split="90,5,5", cache_dir=paths["cache"], seed=1234)
    base.update(kw)
    return BlendConfig(**base)


def test_weights_hold_within_two_percent_over_10k_samples(sources):
    cfg = _cfg(
        sources,
        sources=[
            BlendSource("clinical", sources["clinical"], weight=0.8),
            BlendSource("general", sources["general"], weight=0.2),
        ],
        train_samples=10_000,
        valid_samples=200,
    )
    blend = build_blend(cfg)
    assert len(blend.train) == 10_000
    counts = np.bincount([int(blend.train[i]["dataset_id"]) for i in range(10_000)], minlength=2)
    assert abs(counts[0] / counts.sum() - 0.8) <= 0.02
    rows = {r["source"]: r for r in blend.report["splits"]["train"]["sources"]}
    assert abs(rows["clinical"]["realized_weight"] - 0.8) <= 0.02
    for r in rows.values():  # epochs = tokens drawn / tokens in the source's train split
        assert r["effective_epochs"] == pytest.approx(r["samples"] * 64 / r["tokens_available"], rel=1e-3)
    assert blend.valid is not None and blend.test is None


def test_same_seed_same_samples_other_seed_differs(sources):
    srcs = [
        BlendSource("clinical", sources["clinical"], weight=0.5),
        BlendSource("general", sources["general"], weight=0.5),
    ]
    a = build_blend(_cfg(sources, sources=srcs, train_samples=300))
    b = build_blend(_cfg(sources, sources=srcs, train_samples=300))
    c = build_blend(_cfg(sources, sources=srcs, train_samples=300, seed=99))
    ta = [a.train[i]["tokens"].tolist() for i in range(0, 300, 7)]
    assert ta == [b.train[i]["tokens"].tolist() for i in range(0, 300, 7)]
    assert ta != [c.train[i]["tokens"].tolist() for i in range(0, 300, 7)]


def test_token_budgets_set_weights_samples_and_epochs(sources):
    blend = build_blend(
        _cfg(
            sources,
            sources=[
                BlendSource("clinical", sources["clinical"], tokens=96_000),
                BlendSource("general", sources["general"], tokens=32_000),
            ],
        )
    )
    train = blend.report["splits"]["train"]
    assert train["samples"] == 128_000 // 64
    rows = {r["source"]: r for r in train["sources"]}
    assert rows["clinical"]["target_weight"] == pytest.approx(0.75)
    assert abs(rows["clinical"]["samples"] / train["samples"] - 0.75) <= 0.02
    assert rows["general"]["effective_epochs"] > 0.5  # the 32k-token budget is most of its ~48k tokens
    general = rows["general"]
    assert general["tokens_drawn"] == 32_000  # the budget, in whole 64-token samples
    assert general["effective_epochs"] == pytest.approx(general["tokens_drawn"] / general["tokens_available"],
                                                        abs=1e-4)


@pytest.mark.parametrize(
    "srcs,match",
    [
        ([BlendSource("a", "x", weight=1.0, tokens=5)], "exactly one"),
        ([BlendSource("a", "x", weight=1.0), BlendSource("b", "y", tokens=5)], "not a mix"),
        ([BlendSource("a", "x", weight=1.0)], "train_samples"),
    ],
)
def test_invalid_recipes_are_explained(sources, srcs, match):
    with pytest.raises(ValueError, match=match):
        build_blend(_cfg(sources, sources=srcs))


def test_incomplete_source_is_named(sources, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        build_blend(
            _cfg(sources, sources=[BlendSource("missing", str(tmp_path / "nope"), weight=1.0)], train_samples=10)
        )
