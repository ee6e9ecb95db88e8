"""Loss and gradients under TP/SP/PP/EP equal the single-process ones (2 real gloo ranks)."""

import math

import pytest

from clinmega.runtime.local_group import run_local_group

import parallel_cases

CASES = {
    "tiny-mistral-v0.1": ["tp2", "tp2_sp", "pp2", "pp2_vpp2"],
    # megatron-core's MoE layer refuses TP>1 without sequence parallelism in training.
    "tiny-mixtral": ["tp2_sp", "pp2", "ep2", "tp2_sp_ep2"],
}


@pytest.fixture(scope="module", params=sorted(CASES))
def outcome(request, tmp_path_factory):
    model = request.param
    tmp = tmp_path_factory.mktemp("equiv")
    ranks = run_local_group(parallel_cases.equivalence, 2, (str(tmp), model, CASES[model]))
    assert ranks[0].keys() == ranks[1].keys()
    return model, ranks[0]


@pytest.mark.distributed
def test_layouts_match_single_process(outcome):
    model, results = outcome
    assert set(results) == set(CASES[model])
    for layout, r in results.items():
        assert math.isfinite(r["loss"]), (layout, r)
        assert abs(r["loss"] - r["ref_loss"]) <= 1e-5, (layout, r)
        assert r["grad_scale"] > 0, (layout, r)
        assert r["max_grad_diff"] <= 1e-5, (layout, r)
