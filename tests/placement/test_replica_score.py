"""The replica rule and the scorer on cases worked by hand."""
import numpy as np
import pytest

from placement.plan import PlacementPlan, plan_from_rank_lists
from placement.replica import _water_fill, choose_replica
from placement.score import score_plan


def test_water_fill_is_the_one_at_a_time_greedy():
    rng = np.random.default_rng(0)
    for _ in range(300):
        R = int(rng.integers(1, 5))
        loads, c = rng.integers(0, 10, (1, R)), int(rng.integers(0, 30))
        got = _water_fill(loads, np.array([c]))[0]
        cur, want = loads[0].copy(), np.zeros(R, dtype=int)
        for _ in range(c):
            i = int(np.argmin(cur))
            cur[i] += 1
            want[i] += 1
        assert got.tolist() == want.tolist()


def _rep_plan():
    # rank 0: experts 0, 2 (slots 0, 1); rank 1: experts 1, 2 (slots 2, 3) -> expert 2 on both ranks
    return PlacementPlan.from_phy2log([[0, 2, 1, 2]], 3, 2).validate()


def test_same_rank_first_when_quotas_allow():
    plan = _rep_plan()
    tokens = np.array([[0, 2], [1, 2], [2, 0], [2, 1]])
    slots = choose_replica(tokens, plan.log2phy[0], plan.replica_count[0], 2, 2)
    assert slots.tolist() == [[0, 1], [2, 3], [1, 0], [3, 2]]  # every token stays on one rank


def test_least_loaded_quota_overrides_preference():
    # single-copy load: rank 0 = 3 (expert 0 x3), rank 1 = 1. Expert 2's 4 choices are handed out one at a
    # time to the least-loaded rank: rank1, rank1, tie->rank0, rank1 => quotas [1, 3]. t0..t2 prefer the
    # rank-0 copy but only t0 (first in row order) gets it; t1, t2 fill the rank-1 copy; t3 prefers it.
    plan = _rep_plan()
    tokens = np.array([[0, 2], [0, 2], [0, 2], [1, 2]])
    slots = choose_replica(tokens, plan.log2phy[0], plan.replica_count[0], 2, 2)
    assert slots[:, 1].tolist() == [1, 3, 3, 3]
    load = np.bincount((slots // 2).ravel(), minlength=2)
    assert load.tolist() == [4, 4]


def test_batches_keep_separate_loads():
    plan = _rep_plan()
    tokens = np.array([[0, 2], [0, 2], [1, 2], [1, 2]])
    one = choose_replica(tokens, plan.log2phy[0], plan.replica_count[0], 2, 2, batch=np.array([0, 0, 1, 1]))
    # batch 0: rank0 has 2, rank1 0 -> both choices of expert 2 go to rank 1; batch 1 mirrored
    assert one[:, 1].tolist() == [3, 3, 1, 1]


def test_scores_of_a_known_plan_by_hand():
    plan = plan_from_rank_lists([[[0, 1], [2, 3]], [[0, 1], [2, 3]]], num_experts=4)
    plan.meta["solver_seconds"] = 1.5
    ex = np.array([
        [[0, 1], [2, 3]],  # t0: layer0 ranks {0}, layer1 {1}
        [[0, 2], [0, 1]],  # t1: {0,1}, {0}
        [[2, 3], [0, 3]],  # t2: {1}, {0,1}
        [[1, 3], [0, 1]],  # t3: {0,1}, {0}
    ])
    s = score_plan(plan, ex, batch_size=2, hidden_size=4, dtype_bytes=2, seed=None)
    # fan-out: layer0 1,2,1,2; layer1 1,1,2,1 -> 11 / 8
    assert s["fanout_mean"] == pytest.approx(11 / 8)
    # per token over layers: 2,3,3,3 ranks -> 2.75 x 4 x 2 bytes
    assert s["dispatch_bytes_per_token"] == pytest.approx(22.0)
    # new ranks at layer1: t0 {1} vs {0} -> 1, t1 0, t2 {0,1} vs {1} -> 1, t3 0
    assert s["rank_changes_mean"] == pytest.approx(0.5)
    # batches (t0,t1), (t2,t3): layer0 loads [3,1], [1,3]; layer1 [2,2], [3,1]
    assert s["imbalance_mean"] == pytest.approx((1.5 + 1.5 + 1.0 + 1.5) / 4)
    assert s["imbalance_max"] == pytest.approx(1.5)
    assert s["imbalance_p50"] == pytest.approx(1.5)
    # whole trace: layer0 [4,4] -> 1.0; layer1 [5,3] -> 1.25
    assert s["imbalance_trace"] == pytest.approx(1.125)
    assert s["imbalance_trace_max"] == pytest.approx(1.25)
    assert s["solver_seconds"] == 1.5 and s["replica_slots_per_layer"] == 0


def test_score_rejects_mismatched_trace():
    plan = plan_from_rank_lists([[[0, 1], [2, 3]]], num_experts=4)
    with pytest.raises(ValueError, match="MoE layers"):
        score_plan(plan, np.zeros((4, 2, 2), dtype=int))
    with pytest.raises(ValueError, match="num_experts=4"):
        score_plan(plan, np.full((4, 1, 2), 7))


def test_two_copies_on_one_rank_are_one_bin_of_the_least_loaded_greedy():
    """The rule hands choices out one at a time to the copy whose *rank* is least loaded; a rank holding two
    copies of the expert rises with either. The closed form filled each copy as its own bin, so such a rank
    took a share per copy (here 10.67 vs 9.33 of 20 instead of 10 and 10)."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        N, spr = int(rng.integers(2, 5)), int(rng.integers(2, 4))
        P = N * spr
        copies = int(rng.integers(2, P))  # expert 0's copies, some ranks holding several
        phy = np.concatenate([np.zeros(copies, dtype=int), 1 + np.arange(P - copies)])
        phy = rng.permutation(phy)
        plan = PlacementPlan.from_phy2log(phy[None], P - copies + 1, N)
        tokens = np.stack([rng.choice(plan.num_experts, min(2, plan.num_experts), replace=False) for _ in range(30)])
        slots = choose_replica(tokens, plan.log2phy[0], plan.replica_count[0], spr, N)
        got = np.bincount((slots // spr).ravel(), minlength=N)
        want = np.bincount((plan.log2phy[0, tokens[tokens != 0], 0] // spr), minlength=N)  # single copies
        cand = plan.log2phy[0, 0, :copies] // spr
        for _ in range(int((tokens == 0).sum())):  # one at a time, least-loaded rank, ties -> lowest copy
            want[cand[int(np.argmin(want[cand]))]] += 1
        assert got.tolist() == want.tolist(), (phy.tolist(), tokens.tolist())


def test_score_load_counts_a_rank_once_however_many_copies_it_holds():
    # rank 0: experts 0, 2, 2; rank 1: 1, 1, 2. Expert 2 (12) tops rank 0 (8) and rank 1 (0) up to 10 each.
    plan = PlacementPlan.from_phy2log([[0, 2, 2, 1, 1, 2]], 3, 2).validate()
    from placement.score import score_load

    assert score_load(plan, np.array([[8.0, 0.0, 12.0]]))["imbalance_trace"] == pytest.approx(1.0)
    tokens = np.array([[0]] * 8 + [[2]] * 12)
    slots = choose_replica(tokens, plan.log2phy[0], plan.replica_count[0], 3, 2)
    assert np.bincount((slots // 3).ravel(), minlength=2).tolist() == [10, 10]


def test_a_layer_without_load_is_balanced_in_both_scores():
    """max/mean is 1 where there is no load (nothing is uneven), as the imbalance's 1.0-is-perfect scale
    says: score_load gave 0 for an all-zero layer (0 / 1e-12), dragging imbalance_trace below 1 (the best
    a plan can do) and imbalance_trace_max off. Layer 1 below has no load; layer 0 is 3 vs 1 (1.5)."""
    from placement.score import max_over_mean, score_load

    plan = PlacementPlan.from_phy2log([[0, 1, 2, 3], [0, 1, 2, 3]], 4, 2).validate()
    scores = score_load(plan, np.array([[2.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert scores["imbalance_per_layer"] == pytest.approx([1.5, 1.0])
    assert scores["imbalance_trace"] == pytest.approx(1.25) and scores["imbalance_trace_max"] == pytest.approx(1.5)
    # the token-based score uses the same rule (its loads are never all zero: every token routes K choices)
    assert max_over_mean(np.array([[0.0, 0.0], [3.0, 1.0], [2.0, 2.0]])).tolist() == [1.0, 1.5, 1.0]


def test_score_refuses_negative_and_fractional_expert_ids():
    """-1 (a padding id) indexed log2phy from the end and was scored as the last expert, -4 as expert 0,
    and float ids 0.9 / 1.5 were truncated to 0 / 1: a plan scored on ids it never saw, silently."""
    from placement.online import online_replay

    plan = plan_from_rank_lists([[[0, 1], [2, 3]]], num_experts=4)
    for score in (lambda x: score_plan(plan, x, 4), lambda x: online_replay(plan, x, 4, budget=1)):
        with pytest.raises(ValueError, match=r"expert id -4 < 0"):
            score(np.array([[[0]], [[-1]], [[3]], [[-4]]]))
        with pytest.raises(ValueError, match="expert ids must be integers, got float64"):
            score(np.array([[[0.9]], [[1.5]]]))
    assert score_plan(plan, np.array([[[0]], [[1]], [[2]], [[3]]], dtype=np.int16), 4)["imbalance_trace"] == 1.0


def test_score_load_refuses_loads_that_are_not_counts():
    """A NaN load scored 1.0 (perfect, since f760951 made a zero mean 1.0; NaN before) and a negative one
    cancelled a rank's real load (5 and -5 on rank 0: 2.0 where the counts say nothing sensible)."""
    from placement.score import score_load

    plan = PlacementPlan.from_phy2log([[0, 1, 2, 3]], 4, 2).validate()
    for bad, what in (([np.nan, 1, 1, 1], "1 NaN or infinite"), ([5.0, -5.0, 1, 1], "1 negative"),
                      ([np.inf, 1, 1, 1], "1 NaN or infinite")):
        with pytest.raises(ValueError, match=f"score: load must be finite and >= 0, got {what}"):
            score_load(plan, np.array([bad]))
    assert score_load(plan, np.array([[3.0, 1.0, 2.0, 2.0]]))["imbalance_trace"] == 1.0
