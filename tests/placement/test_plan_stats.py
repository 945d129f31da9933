"""Plan format and statistics: golden cases worked by hand, validation messages, file round trips."""
import numpy as np
import pytest

from placement.plan import PlacementPlan, plan_from_rank_lists
from placement.stats import coactivation, expert_load, transitions, window_loads


def test_from_phy2log_inverse_maps_by_hand():
    # 2 ranks x 2 slots; expert 2 replicated on both ranks: slots [0, 2 | 1, 2]
    plan = PlacementPlan.from_phy2log([[0, 2, 1, 2]], num_experts=3, num_ranks=2).validate()
    assert plan.slots_per_rank == 2 and plan.num_slots == 4
    assert plan.replica_count.tolist() == [[1, 1, 2]]
    assert plan.log2phy.tolist() == [[[0, -1], [2, -1], [1, 3]]]
    assert plan.rank_of_slot(3) == 1 and plan.rank_of_slot(1) == 0
    assert plan.expert_ranks()[0].tolist() == [[True, False], [False, True], [True, True]]


def test_validate_names_layer_and_expert():
    plan = plan_from_rank_lists([[[0, 1], [2, 3]], [[0, 1], [2, 3]]], num_experts=4)
    plan.validate()
    bad = plan_from_rank_lists([[[0, 1], [2, 3]], [[0, 1], [2, 2]]], num_experts=4)
    with pytest.raises(ValueError, match="layer 1 expert 3 is not placed"):
        bad.validate()
    wrong_count = PlacementPlan(plan.phy2log, plan.log2phy, plan.replica_count.copy(), 2, 2)
    wrong_count.replica_count[0, 1] = 2
    with pytest.raises(ValueError, match="layer 0 expert 1 has replica_count 2 but 1 slots"):
        wrong_count.validate()
    overfull = PlacementPlan(plan.phy2log, plan.log2phy, plan.replica_count, num_ranks=1, slots_per_rank=3)
    with pytest.raises(ValueError, match="overfill"):
        overfull.validate()
    bad_inverse = PlacementPlan(plan.phy2log, plan.log2phy.copy(), plan.replica_count, 2, 2)
    bad_inverse.log2phy[1, 2, 0] = 0
    with pytest.raises(ValueError, match="layer 1 expert 2: log2phy"):
        bad_inverse.validate()


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_save_load_round_trip(tmp_path, suffix):
    plan = PlacementPlan.from_phy2log([[0, 2, 1, 2], [1, 0, 2, 1]], 3, 2, dict(algorithm="hand"))
    path = tmp_path / f"plan{suffix}"
    plan.save(path)
    back = PlacementPlan.load(path)
    for key in ("phy2log", "log2phy", "replica_count"):
        np.testing.assert_array_equal(getattr(back, key), getattr(plan, key))
    assert (back.num_ranks, back.slots_per_rank, back.meta["algorithm"]) == (2, 2, "hand")


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="format"):
        PlacementPlan.load(path)
    with pytest.raises(FileNotFoundError):
        PlacementPlan.load(tmp_path / "missing.json")


def test_statistics_by_hand():
    # t0: layer0 {0,1}, layer1 {1,2};  t1: layer0 {0,2}, layer1 {1,0}
    ex = np.array([[[0, 1], [1, 2]], [[0, 2], [1, 0]]])
    assert expert_load(ex, 3).tolist() == [[2, 1, 1], [1, 2, 1]]
    c = coactivation(ex, 3)
    assert c[0].tolist() == [[0, 1, 1], [1, 0, 0], [1, 0, 0]]
    assert c[1].tolist() == [[0, 1, 0], [1, 0, 1], [0, 1, 0]]
    t = transitions(ex, 3)
    assert t.shape == (1, 3, 3)
    assert t[0].tolist() == [[1, 2, 1], [0, 1, 1], [1, 1, 0]]
    w = window_loads(ex, window=1, num_experts=3)
    assert w.shape == (2, 2, 3) and w.sum(0).tolist() == expert_load(ex, 3).tolist()
    assert w[1, 0].tolist() == [1, 0, 1]
