"""online_replay (`place eval --online-budget`) on a trace of another shape than the plan: an error
naming both, like the static scorer, not an IndexError or a replay of only the trace's layers."""
import numpy as np
import pytest

from placement.online import online_replay
from placement.plan import PlacementPlan


def _trace(T, L, E=8, K=2, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(T)])


@pytest.mark.parametrize("plan_layers, trace_layers", [(1, 2), (3, 2)])
def test_online_replay_refuses_a_layer_count_mismatch(plan_layers, trace_layers):
    plan = PlacementPlan.from_phy2log([list(range(8))] * plan_layers, 8, 2)
    with pytest.raises(ValueError, match=f"trace has {trace_layers} MoE layers, plan has {plan_layers}"):
        online_replay(plan, _trace(64, trace_layers), batch_size=16, budget=2)


def test_online_replay_refuses_ids_past_the_plan_and_empty_traces():
    plan = PlacementPlan.from_phy2log([list(range(4))] * 2, 4, 2)
    with pytest.raises(ValueError, match="expert id 7 >= plan num_experts=4"):
        online_replay(plan, np.full((32, 2, 2), 7), batch_size=16, budget=2)
    with pytest.raises(ValueError, match="trace has no tokens"):
        online_replay(plan, np.zeros((0, 2, 2), dtype=np.int64), batch_size=16, budget=2)
