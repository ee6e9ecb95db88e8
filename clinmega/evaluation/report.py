"""Accuracy summaries with seeded bootstrap confidence intervals, written as JSON, Markdown and a PNG chart.

All files are written atomically (temporary name, then rename).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from clinmega.evaluation.benchmarks import BENCHMARK_GROUPS
from clinmega.evaluation.scoring import ItemResult
from clinmega.utils.atomic import tmp_sibling

METRICS = ("acc", "acc_norm", "acc_bytes")
AGGREGATED_GROUPS = ("multimedqa",)  # lm-eval groups with a size-weighted mean acc (aggregate_metric_list)


def bootstrap_ci(correct: Sequence[bool], n_resamples: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``correct``."""
    x = np.asarray(correct, dtype=np.float64)
    if x.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def summarize(results: Sequence[ItemResult], n_resamples: int = 2000, seed: int = 0) -> list[dict]:
    """One row per (benchmark, strategy): n, unparsed answers, and each metric with its 95% CI; plus a
    ``multimedqa`` row (lm-eval's group: size-weighted mean acc) per strategy that ran all its members."""
    groups: dict[tuple[str, str], list[ItemResult]] = {}
    for r in results:
        groups.setdefault((r.benchmark, r.strategy), []).append(r)
    rows = []
    for (benchmark, strategy), rs in groups.items():
        row = {"benchmark": benchmark, "strategy": strategy, "n": len(rs),
               "unanswered": sum(r.pred is None for r in rs)}
        preds = {"acc": [r.pred for r in rs], "acc_norm": [r.pred_norm for r in rs],
                 "acc_bytes": [r.pred_bytes for r in rs]}
        for metric in METRICS:
            if metric != "acc" and all(p is None for p in preds[metric]):
                continue  # generation strategies have no length-normalised variant
            correct = [p == r.answer for p, r in zip(preds[metric], rs)]
            low, high = bootstrap_ci(correct, n_resamples=n_resamples, seed=seed)
            row[metric] = {"value": float(np.mean(correct)), "ci95": [low, high]}
        if (bias := order_bias(rs)) is not None:
            row["order_bias"] = bias
        rows.append(row)
    for group in AGGREGATED_GROUPS:  # size-weighted mean of the members' acc = accuracy over all their items
        members = BENCHMARK_GROUPS[group]
        for strategy in dict.fromkeys(r.strategy for r in results):
            if all((b, strategy) in groups for b in members):
                rs = [r for b in members for r in groups[(b, strategy)]]
                correct = [r.pred == r.answer for r in rs]
                low, high = bootstrap_ci(correct, n_resamples=n_resamples, seed=seed)
                rows.append({"benchmark": group, "strategy": strategy, "n": len(rs),
                             "unanswered": sum(r.pred is None for r in rs), "members": list(members),
                             "acc": {"value": float(np.mean(correct)), "ci95": [low, high]}})
    return rows


def order_bias(results: Sequence[ItemResult]) -> dict | None:
    """Answer-order bias of a choice-shuffle run (None when the options were shown in one order only).

    Every variant (an option order, x samples) counts once: ``acc_by_gold_position[j]`` is the accuracy of the
    variants whose gold answer was shown at position j (A, B, ...) and ``chosen_position_share[j]`` how often
    position j was chosen; ``flip_rate`` is the fraction of permuted variants whose chosen option (mapped back
    to the original options) differs from the original order's choice, ``consistent`` the fraction of items
    that chose the same option in every order.
    """
    if not any(len({tuple(o) for o in r.orders}) > 1 for r in results):
        return None
    n_pos = max(len(o) for r in results for o in r.orders)
    hits, shown, chosen = np.zeros(n_pos), np.zeros(n_pos), np.zeros(n_pos)
    flips, permuted, consistent = 0, 0, 0
    for r in results:
        original = next((v for v, o in zip(r.votes, r.orders) if o == sorted(o)), r.votes[0])
        for vote, order in zip(r.votes, r.orders):
            gold_at = order.index(r.answer)
            shown[gold_at] += 1
            hits[gold_at] += vote == r.answer
            if vote is not None:
                chosen[order.index(vote)] += 1
            if order != sorted(order):
                permuted += 1
                flips += vote != original
        consistent += len(set(r.votes)) == 1
    with np.errstate(invalid="ignore"):
        by_position = np.where(shown > 0, hits / np.maximum(shown, 1), np.nan)
    return {"acc_by_gold_position": [None if np.isnan(a) else float(a) for a in by_position],
            "variants_by_gold_position": shown.astype(int).tolist(),
            "chosen_position_share": (chosen / max(1.0, chosen.sum())).tolist(),
            "flip_rate": flips / permuted if permuted else 0.0, "consistent": consistent / len(results)}


def bias_table(rows: Sequence[dict]) -> str:
    """Markdown for the rows that have an ``order_bias`` (choice-shuffle runs); empty when none has."""
    biased = [r for r in rows if "order_bias" in r]
    if not biased:
        return ""
    n_pos = max(len(r["order_bias"]["acc_by_gold_position"]) for r in biased)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n_pos]
    lines = ["\nAnswer-order bias (choice shuffle): accuracy by the gold answer's position, flip rate",
             "", "| benchmark | strategy | " + " | ".join(f"acc@{c}" for c in letters) + " | flip rate | consistent |",
             "|---|---|" + "---:|" * n_pos + "---:|---:|"]
    for r in biased:
        b = r["order_bias"]
        cells = [("" if a is None else f"{a:.3f}") for a in b["acc_by_gold_position"]]
        cells += [""] * (n_pos - len(cells))
        lines.append(f"| {r['benchmark']} | {r['strategy']} | " + " | ".join(cells)
                     + f" | {b['flip_rate']:.3f} | {b['consistent']:.3f} |")
    return "\n".join(lines) + "\n"


def markdown_table(rows: Sequence[dict]) -> str:
    lines = ["| benchmark | strategy | n | acc | 95% CI | acc_norm | unanswered |",
             "|---|---|---:|---:|---|---:|---:|"]
    for r in rows:
        acc, norm = r["acc"], r.get("acc_norm")
        lines.append(f"| {r['benchmark']} | {r['strategy']} | {r['n']} | {acc['value']:.3f} | "
                     f"[{acc['ci95'][0]:.3f}, {acc['ci95'][1]:.3f}] | "
                     f"{'' if norm is None else format(norm['value'], '.3f')} | {r['unanswered']} |")
    return "\n".join(lines) + "\n" + bias_table(rows)


def bar_chart(rows: Sequence[dict], path: Path, title: str = "clinmega evaluation") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benchmarks = list(dict.fromkeys(r["benchmark"] for r in rows))
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    width = 0.8 / max(1, len(strategies))
    biased = [r for r in rows if "order_bias" in r]
    size = (min(20.0, max(6.0, 2.0 + 0.3 * len(benchmarks) * len(strategies))), 4.5)
    if biased:
        fig, (ax, bias_ax) = plt.subplots(2, 1, figsize=(size[0], 9.0))
        _order_bias_panel(bias_ax, biased)
    else:
        fig, ax = plt.subplots(figsize=size)
    colors = plt.get_cmap("tab20" if len(strategies) > 10 else "tab10").colors
    for k, strategy in enumerate(strategies):
        xs, values, errors = [], [], [[], []]
        for j, b in enumerate(benchmarks):
            row = next((r for r in rows if r["benchmark"] == b and r["strategy"] == strategy), None)
            if row is None:
                continue
            v, (lo, hi) = row["acc"]["value"], row["acc"]["ci95"]
            xs.append(j + (k - (len(strategies) - 1) / 2) * width)
            values.append(v)
            errors[0].append(v - lo)
            errors[1].append(hi - v)
        ax.bar(xs, values, width, yerr=errors, capsize=2, label=strategy, color=colors[k % len(colors)],
               error_kw={"elinewidth": 0.8})
    ax.set_xticks(range(len(benchmarks)), benchmarks, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (95% bootstrap CI)")
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def _order_bias_panel(ax, biased: Sequence[dict]) -> None:
    n_pos = max(len(r["order_bias"]["acc_by_gold_position"]) for r in biased)
    width = 0.8 / len(biased)
    for k, r in enumerate(biased):
        accs = [np.nan if a is None else a for a in r["order_bias"]["acc_by_gold_position"]]
        xs = [j + (k - (len(biased) - 1) / 2) * width for j in range(len(accs))]
        ax.bar(xs, accs, width, label=f"{r['benchmark']}/{r['strategy']} (flip {r['order_bias']['flip_rate']:.2f})")
    ax.set_xticks(range(n_pos), [f"gold at {c}" for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n_pos]])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("answer-order bias (choice shuffle)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))


def write_report(out_dir: str | Path, results: Sequence[ItemResult], meta: dict, n_resamples: int = 2000,
                 seed: int = 0) -> dict[str, Path]:
    """Write ``results.json`` (meta, summary, items), ``results.md`` and ``accuracy.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(results, n_resamples=n_resamples, seed=seed)
    payload = {"meta": {**meta, "bootstrap": {"resamples": n_resamples, "seed": seed, "confidence": 0.95}},
               "summary": rows, "items": [r.to_dict() for r in results]}
    paths = {"json": out / "results.json", "markdown": out / "results.md", "chart": out / "accuracy.png"}
    _atomic(paths["json"], lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1, ensure_ascii=False)))
    _atomic(paths["markdown"], lambda tmp: Path(tmp).write_text(markdown_table(rows)))
    bar_chart(rows, paths["chart"])
    return paths


def save_part(path: Path, key: str, results: Sequence[ItemResult], seconds: float) -> None:
    """One finished benchmark/strategy run, for resuming (`load_part`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"key": key, "seconds": seconds, "items": [r.to_dict() for r in results]}
    _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, ensure_ascii=False)))


def load_part(path: Path, key: str) -> tuple[list[ItemResult], float] | None:
    """The saved results when ``path`` exists and was written for the same ``key``, else None."""
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    if payload.get("key") != key:
        return None
    return [ItemResult(**d) for d in payload["items"]], float(payload["seconds"])


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path`` (:mod:`clinmega.utils.atomic`'s temp names)."""
    tmp = tmp_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
