"""Loss and gradients under TP/SP/PP/EP equal the single-process ones (2 real gloo ranks), and
packed SFT with uneven loss-token counts gives the per-token mean over the global batch at DP1,
DP2 and PP2. One spawned group runs every case of parallel_cases.TABLE."""

import math

import pytest

import parallel_cases as pc

LAYOUT_CASES = [pc.mistral_tp2, pc.mistral_tp2_sp, pc.mistral_pp2, pc.mistral_pp2_vpp2,
                pc.mixtral_tp2_sp, pc.mixtral_pp2, pc.mixtral_ep2, pc.mixtral_tp2_sp_ep2]
PACKED_CASES = [pc.packed_dp1, pc.packed_dp2, pc.packed_pp2]
REL_TOL = 1e-5  # per tensor, relative to the tensor's largest reference gradient entry


def name(case) -> str:
    return case.__name__


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    return pc.TABLE.spawn(tmp_path_factory.mktemp("equiv"))


def assert_gradients_match(r: dict) -> None:
    assert r["grad_scale"] > 0, r
    assert r["max_grad_diff"] <= 1e-5, r
    assert r["min_grad_norm"] > 1e-4, r  # every tensor gets a real gradient
    assert r["max_rel_diff"] <= REL_TOL, r


@pytest.mark.distributed
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=name)
def test_layout_matches_single_process(group, case):
    a, b = group.ranks(case)
    assert a.keys() == b.keys()
    r = a
    assert math.isfinite(r["loss"]), r
    assert abs(r["loss"] - r["ref_loss"]) <= 1e-5, r
    assert_gradients_match(r)


@pytest.mark.distributed
@pytest.mark.parametrize("case", PACKED_CASES, ids=name)
def test_packed_uneven_loss_is_the_per_token_mean_of_the_global_batch(group, case):
    r = group[case]
    per_rank = r["loss_tokens"]
    assert len({n for t in per_rank for n in t}) > 1, per_rank  # uneven across microbatches...
    if case is pc.packed_dp2:
        assert sum(per_rank[0]) != sum(per_rank[1]), per_rank  # ...and across DP ranks
    assert math.isfinite(r["loss"]), r
    assert abs(r["loss"] - r["ref_loss"]) <= 1e-5, r
    assert_gradients_match(r)
