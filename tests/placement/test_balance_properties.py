"""Balance properties of the load-aware algorithms over seeded random loads: no rank holds two copies of
one expert when the expert has no more copies than the ranks it may live on (EPLB)."""
import numpy as np
import pytest

from placement.algorithms import get_algorithm
from placement.algorithms.eplb import balanced_packing


def _loads(n, seed):
    """(num_ranks, slots_per_rank, load [L, E]) with spare slots: uniform, Zipf-skewed, or integer counts."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        N, E, L = int(rng.integers(2, 9)), int(rng.integers(2, 33)), int(rng.integers(1, 4))
        spr = -(-E // N) + int(rng.integers(0, 4))
        load = [rng.random((L, E)) * 100, rng.zipf(1.3, (L, E)).astype(float),
                rng.integers(0, 5, (L, E)).astype(float)][i % 3]
        yield N, spr, load


def _doubled(plan, ranks_per_expert):
    """(layer, expert, ranks) where a rank holds two copies of an expert that has <= ranks_per_expert copies."""
    held = plan.expert_ranks().sum(-1)  # [L, E] distinct ranks holding each expert
    bad = (held < plan.replica_count) & (plan.replica_count <= ranks_per_expert)
    return [(int(l), int(e), np.flatnonzero(plan.expert_ranks()[l, e]).tolist()) for l, e in zip(*np.nonzero(bad))]


def test_eplb_never_puts_two_copies_of_an_expert_on_one_rank():
    for N, spr, load in _loads(200, seed=0):
        plan = get_algorithm("eplb")(load, N, spr).validate()
        assert not _doubled(plan, N), (N, spr, load.tolist(), plan.phy2log.tolist())


@pytest.mark.parametrize("num_nodes", [2, 4])
def test_eplb_hierarchical_never_puts_two_copies_of_an_expert_on_one_gpu_of_its_node(num_nodes):
    rng = np.random.default_rng(num_nodes)
    for _ in range(60):  # copies of an expert stay inside its node's gpus: that is its limit
        gpus = num_nodes * int(rng.integers(1, 4))
        E = num_nodes * int(rng.integers(1, 6))
        spr = -(-E // gpus) + int(rng.integers(0, 3))
        load = rng.zipf(1.3, (2, E)).astype(float)
        plan = get_algorithm("eplb")(load, gpus, spr, num_nodes=num_nodes).validate()
        assert not _doubled(plan, gpus // num_nodes), (gpus, spr, load.tolist(), plan.phy2log.tolist())


def test_balanced_packing_keeps_same_label_items_apart_by_hand():
    # items 0, 1 are two copies (label 7) of weight 5, items 2, 3 singletons of 1 and 0.5; 2 packs of 2.
    # Greedy: 5 -> pack 0, 5 -> pack 1, 1 -> pack 0, 0.5 -> pack 1; with label 7 on items 0 and 1 nothing moves
    w, lab = np.array([[5.0, 5.0, 1.0, 0.5]]), np.array([[7, 7, 1, 2]])
    assert balanced_packing(w, 2, lab)[0].tolist() == [[0, 1, 0, 1]]
    # weights 4, 1, 1, 1 with items 1, 2 copies of one expert: plain greedy puts them together on pack 1
    w, lab = np.array([[4.0, 1.0, 1.0, 1.0]]), np.array([[0, 5, 5, 6]])
    assert balanced_packing(w, 2)[0].tolist() == [[0, 1, 1, 0]]
    pack, pos = balanced_packing(w, 2, lab)
    assert pack[0, 1] != pack[0, 2] and np.bincount(pack[0]).tolist() == [2, 2]
    assert sorted(zip(pack[0], pos[0])) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # positions stay a permutation


def _imbalance(plan, load):
    from placement.score import score_load

    return np.array(score_load(plan, load)["imbalance_per_layer"])


def test_with_spare_slots_eplb_and_affinity_balance_the_fitted_load_no_worse_than_contiguous():
    """On the load they are fitted on, with replicas split by the run-time rule (score_load): EPLB never
    worse than the contiguous layout, affinity at most balance_tol (2%) worse, buying fan-out with it.
    Before: a rank holding k copies took k shares of the expert (up to 1.47x contiguous's max/mean), and
    the even-share packing lost to contiguous by up to 9% on small integer loads. Excluded: layers where
    contiguous doubles a copy on one rank, which eplb refuses (test above) even where it levels better."""
    from placement.algorithms.common import doubled_copies

    checked = 0
    for N, spr, load in _loads(120, seed=1):
        if N * spr == load.shape[1] or load.sum() == 0:
            continue
        base = get_algorithm("contiguous")(load, N, spr)
        ok = np.array([doubled_copies(base.phy2log[l], base.num_experts, N) == 0 for l in range(len(load))])
        ref = _imbalance(base, load)[ok]
        eplb = _imbalance(get_algorithm("eplb")(load, N, spr), load)[ok]
        ours = _imbalance(get_algorithm("affinity")(load, N, spr), load)[ok]
        assert np.all(eplb <= ref + 1e-9), (N, spr, load.tolist(), eplb, ref)
        assert np.all(ours <= ref * 1.02 + 1e-9), (N, spr, load.tolist(), ours, ref)
        checked += int(ok.sum())
    assert checked > 100
