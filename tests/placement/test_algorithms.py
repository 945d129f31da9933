"""Algorithms: golden small cases, EPLB's published example, plan invariants (hypothesis)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from placement.algorithms import ALGORITHMS, get_algorithm
from placement.algorithms.common import replicate_greedy
from placement.algorithms.eplb import balanced_packing, rebalance_experts
from placement.score import score_plan


def test_contiguous_and_round_robin_by_hand():
    # E=4 on 2 ranks x 3 slots. Spare slots: expert 0 (10 -> 5 per copy), then expert 3 (6 -> 3).
    # Each replica goes to the lighter rank with room that lacks it.
    load = np.array([[10.0, 1.0, 1.0, 6.0]])
    assert replicate_greedy(load[0], 6).tolist() == [2, 1, 1, 2]
    assert get_algorithm("contiguous")(load, 2, 3).phy2log.tolist() == [[0, 1, 3, 2, 3, 0]]
    assert get_algorithm("round_robin")(load, 2, 3).phy2log.tolist() == [[0, 2, 3, 1, 3, 0]]


def test_eplb_reproduces_published_example():
    # github.com/deepseek-ai/EPLB README: 2 layers x 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs
    weight = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                       [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    phy2log, log2phy, count = rebalance_experts(weight, 16, 4, 2, 8)
    assert phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    assert count.sum(1).tolist() == [16, 16]
    plan = get_algorithm("eplb")(weight, 8, 2, num_nodes=2, num_groups=4).validate()
    assert plan.phy2log.tolist() == phy2log.tolist()


def test_balanced_packing_by_hand():
    # descending 9, 7, 5, 3 -> packs 0, 1, 1, 0 (each item to the lighter open pack)
    pack, pos = balanced_packing(np.array([[5.0, 9.0, 3.0, 7.0]]), 2)
    assert pack.tolist() == [[1, 0, 0, 1]] and pos.tolist() == [[1, 0, 1, 0]]


def test_unknown_algorithm_and_bad_sizes():
    with pytest.raises(ValueError, match="not one of"):
        get_algorithm("magic")
    with pytest.raises(ValueError, match="cannot hold E=8"):
        get_algorithm("eplb")(np.ones((1, 8)), 2, 3)


@settings(max_examples=25, deadline=None)
@given(L=st.integers(1, 3), E=st.integers(2, 16), N=st.integers(1, 5), spare=st.integers(0, 2),
       seed=st.integers(0, 10_000), zipf=st.booleans())
def test_plan_invariants(L, E, N, spare, seed, zipf):
    rng = np.random.default_rng(seed)
    spr = -(-E // N) + spare
    load = rng.zipf(1.5, (L, E)).astype(float) if zipf else rng.integers(0, 50, (L, E)).astype(float)
    load[:, rng.integers(0, E)] = 0.0  # a zero-load expert
    K = min(2, E)
    tokens = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(40)])
    coact = rng.random((L, E, E))
    for name, algorithm in ALGORITHMS.items():
        plan = algorithm(load, N, spr, coact=coact, tokens=tokens, max_iters=5).validate()
        assert plan.phy2log.shape == (L, N * spr), name
        assert (plan.replica_count >= 1).all() and (plan.replica_count.sum(1) == N * spr).all(), name
        assert np.bincount(plan.rank_of_slot(np.arange(N * spr)), minlength=N).tolist() == [spr] * N
        for l in range(L):  # the inverse map agrees with the forward one
            for e in range(E):
                slots = plan.log2phy[l, e][plan.log2phy[l, e] >= 0]
                assert (plan.phy2log[l, slots] == e).all() and len(slots) == plan.replica_count[l, e]


def _clustered_tokens(T, L, E, N, K, seed):
    """Tokens whose K experts come from one of N hidden clusters (scattered ids), load Zipf-skewed."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(E)
    clusters = perm.reshape(N, E // N)
    out = np.empty((T, L, K), dtype=np.int64)
    for t in range(T):
        c = clusters[rng.integers(N)]
        for l in range(L):
            out[t, l] = rng.choice(c, K, replace=False)
    return out


def test_affinity_finds_hidden_clusters_and_stays_balanced():
    E, N, K = 16, 4, 3
    tokens = _clustered_tokens(800, 2, E, N, K, seed=1)
    load = np.stack([np.bincount(tokens[:, l].ravel(), minlength=E) for l in range(2)]).astype(float)
    ours = get_algorithm("affinity")(load, N, 5, tokens=tokens)
    base = get_algorithm("eplb")(load, N, 5)
    s_ours, s_base = score_plan(ours, tokens, 800), score_plan(base, tokens, 800)
    # perfect co-location would give 1.0 (one rank per token); swaps alone stop short of it
    assert s_ours["fanout_mean"] < 0.75 * s_base["fanout_mean"]
    assert s_ours["imbalance_trace"] < 1.1
    pairs = get_algorithm("affinity")(load, N, 5, coact=np.stack([np.eye(E)] * 2) + _coact(tokens, E))
    assert score_plan(pairs, tokens, 800)["fanout_mean"] < s_base["fanout_mean"]


def _coact(tokens, E):
    from placement.stats import coactivation

    return coactivation(tokens, E)


def test_affinity_contiguous_windows_balance_each_phase_of_the_trace():
    # first half of the fitted trace uses experts 0-3 only, the second half 4-7 only (top-2, 1 layer):
    # clustering by co-activation puts each half's experts on one rank (fan-out 1, totals balanced, but
    # each half loads one rank only); in-order windows of half the trace make the search spread them
    rng = np.random.default_rng(0)
    first = np.stack([rng.choice(4, 2, replace=False) for _ in range(400)])
    tokens = np.concatenate([first, first + 4])[:, None, :]
    load = np.bincount(tokens.ravel(), minlength=8)[None].astype(float)
    plain = get_algorithm("affinity")(load, 2, 4, tokens=tokens).validate()
    robust = get_algorithm("affinity")(load, 2, 4, tokens=tokens, window_tokens=400,
                                       contiguous_windows=True).validate()
    half = lambda plan: score_plan(plan, tokens[:400], 400, seed=None)["imbalance_mean"]
    assert half(plain) > 1.9  # the clustered plan: all of the first half on one rank
    assert half(robust) < 1.1
    assert robust.meta["contiguous_windows"] is True


def test_swap_search_excess_tol_leaves_near_balanced_ranks_to_the_cost():
    from placement.algorithms.swap_search import swap_search

    # rank 0 holds loads 3 + 2, rank 1 holds 1 + 0 (mean 3): one swap (2 <-> 0 or 3 <-> 1) balances them.
    # The token cost is flat, so only the balance term can ask for the swap.
    item_rank, item_expert, item_load = np.array([0, 0, 1, 1]), np.arange(4), np.array([3.0, 2.0, 1.0, 0.0])
    flat = lambda ir: np.zeros((4, 4))
    ranks, swaps = swap_search(item_rank, item_expert, item_load, 2, flat, cap=10.0, balance_weight=1.0)
    assert swaps == 1 and np.bincount(ranks, weights=item_load).tolist() == [3.0, 3.0]
    # excess only above 2x the mean (6): rank 0's 5 is not excess, nothing to gain
    ranks, swaps = swap_search(item_rank, item_expert, item_load, 2, flat, cap=10.0, balance_weight=1.0,
                               excess_tol=1.0)
    assert swaps == 0 and ranks.tolist() == [0, 0, 1, 1]


def test_options_are_the_keyword_parameters_past_the_common_interface():
    from placement.algorithms import check_options, options

    assert options("contiguous") == options("round_robin") == []
    assert options("eplb") == ["num_groups", "num_nodes"]
    assert {"max_iters", "balance_tol", "window_tokens", "uniform_blend"} <= set(options("affinity"))
    assert not set(options("affinity")) & {"load", "coact", "transitions", "tokens"}
    check_options("affinity", {"max_iters": 3, "rounds": 1})
    with pytest.raises(ValueError, match=r"affinity does not take parameter 'max_iter'; .*did you mean 'max_iters'"):
        check_options("affinity", {"max_iter": 3})
    with pytest.raises(ValueError, match="not one of"):
        check_options("magic", {})
