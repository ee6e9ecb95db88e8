"""Report rows beyond plain accuracy: answer-order bias of choice-shuffle runs, lm-eval's multimedqa group."""

import json
from dataclasses import replace

from test_eval_strategies import ITEM, FakeBackend, by_text, first_position

from clinmega.evaluation.benchmarks import BENCHMARK_GROUPS
from clinmega.evaluation.report import order_bias, summarize, write_report
from clinmega.evaluation.scoring import ItemResult, run_strategy
from clinmega.evaluation.strategies import Strategy

SHUFFLE = Strategy("choice_shuffle", permutations=24)  # all 4! orders: every position holds the gold 6 times


def items(n):
    return [replace(ITEM, id=f"q{k}", answer=k % 4) for k in range(n)]


def test_position_bias_is_measured():
    results = run_strategy(FakeBackend(first_position), items(4), [], SHUFFLE)  # always picks what is shown first
    bias = order_bias(results)
    assert bias["acc_by_gold_position"] == [1.0, 0.0, 0.0, 0.0]
    assert bias["chosen_position_share"] == [1.0, 0.0, 0.0, 0.0]
    assert bias["variants_by_gold_position"] == [24, 24, 24, 24]
    assert abs(bias["flip_rate"] - 18 / 23) < 1e-12  # of the 23 permuted orders, 5 keep the first option first
    assert bias["consistent"] == 0.0


def test_content_following_model_has_no_order_bias(tmp_path):
    results = run_strategy(FakeBackend(by_text("Vitamin C")), items(1), [], SHUFFLE)
    bias = order_bias(results)
    assert bias["flip_rate"] == 0.0 and bias["consistent"] == 1.0
    assert order_bias(run_strategy(FakeBackend(first_position), items(2), [], Strategy())) is None
    paths = write_report(tmp_path, results, {"model": "fake"}, n_resamples=10)
    [row] = json.loads(paths["json"].read_text())["summary"]
    assert row["order_bias"]["flip_rate"] == 0.0
    assert "Answer-order bias" in paths["markdown"].read_text() and paths["chart"].stat().st_size > 0


def test_multimedqa_row_is_size_weighted():
    def result(benchmark, correct):
        return ItemResult(benchmark, "zero_shot", "x", 0, 0 if correct else 1, correct)

    members = BENCHMARK_GROUPS["multimedqa"]
    results = [result(members[0], True)] * 90 + [result(members[0], False)] * 10  # 0.9 on 100 items
    results += [result(b, k == 0) for b in members[1:] for k in range(10)]  # 0.1 on 10 items each
    rows = {r["benchmark"]: r for r in summarize(results, n_resamples=10)}
    assert rows["multimedqa"]["n"] == 180 and abs(rows["multimedqa"]["acc"]["value"] - 98 / 180) < 1e-12
    partial = [r for r in results if r.benchmark != members[-1]]
    assert "multimedqa" not in {r["benchmark"] for r in summarize(partial, n_resamples=10)}
