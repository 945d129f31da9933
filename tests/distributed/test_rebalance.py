"""Online rebalancing and placement commands move experts between ranks mid-generation and change
no output: greedy tokens equal the single-process ones, logits within tolerance."""
import json

import numpy as np
import pytest
import torch

from moe_serve.config import ModelConfig, ParallelConfig
from moe_serve.distributed import messages as m
from moe_serve.distributed.executor import DistributedModel
from moe_serve.models import load_model
from placement.plan import PlacementPlan
from tests.distributed.helpers import greedy
from tests.models.tiny_checkpoints import make_tiny_checkpoint


def test_rebalance_mid_generation_changes_no_output(tmp_path):
    ckpt = make_tiny_checkpoint("mixtral", tmp_path / "mixtral")  # 8 experts, top-2, 3 MoE layers
    ref = load_model(ckpt)
    ref.allocate_kv_cache(4, 64)
    want_tokens, want_logits = greedy(ref, steps=10)
    dm = DistributedModel(ModelConfig(model=str(ckpt)),
                          ParallelConfig(tp=1, ep=2, dispatch="alltoall", redundant_experts=2, rebalance_every=3,
                                         rebalance_window=3, allreduce="gloo", threads_per_rank=1))
    seen = []
    try:
        dm.allocate_kv_cache(4, 64)

        def before(step):
            seen.append(dm.dispatch_stats())
            if step == 7:  # an explicit placement command too: swap the two ranks' halves of every layer
                L, P = 3, 10
                swapped = np.concatenate([np.arange(5, 10) % 8, np.arange(0, 5)])[None].repeat(L, 0)
                dm.switch_placement(PlacementPlan.from_phy2log(swapped, 8, 2))

        got_tokens, got_logits = greedy(dm, steps=10, kill=before)
        seen.append(dm.dispatch_stats())
    finally:
        dm.close()
    assert got_tokens == want_tokens
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    # both ranks answer (data-parallel attention), so each counter is reported twice
    switches = [s.get("rebalance_switches", 0) / 2 for s in seen]
    assert switches[-1] == 4, switches  # rebalanced after steps 2, 5, 8, plus the command before step 7
    assert switches[3] == 1 and seen[3]["rebalance_moved_experts"] > 0, seen[3]  # live loads moved weights


def test_a_plan_the_ranks_cannot_use_is_refused_and_serving_goes_on(tmp_path, capfd):
    ckpt = make_tiny_checkpoint("mixtral", tmp_path / "mixtral")  # 8 experts, 3 MoE layers
    ref = load_model(ckpt)
    ref.allocate_kv_cache(4, 64)
    want_tokens, _ = greedy(ref, steps=2)
    dm = DistributedModel(ModelConfig(model=str(ckpt)),
                          ParallelConfig(tp=1, ep=2, allreduce="gloo", threads_per_rank=1))
    try:
        dm.allocate_kv_cache(4, 64)
        greedy(dm, steps=2)
        ident = np.arange(8)[None]
        for bad, why in [(PlacementPlan.from_phy2log(ident.repeat(2, 0), 8, 2), "2 layers"),  # a layer short
                         (PlacementPlan.from_phy2log(ident.repeat(3, 0), 8, 4), "4 ranks"),
                         (PlacementPlan.from_phy2log(np.arange(10)[None].repeat(3, 0) % 8, 8, 2), "5 slots"),
                         # expert 7 in no slot: a token routed to it went to slot -1 (rank -1), a rank failure
                         (PlacementPlan.from_phy2log(np.r_[0, np.arange(7)][None].repeat(3, 0), 8, 2),
                          "layer 0 expert 7 is not placed")]:
            with pytest.raises(ValueError, match=why):
                dm.switch_placement(bad)
        with pytest.raises(ValueError, match="at_step"):  # a step already run would never switch
            dm.switch_placement(PlacementPlan.from_phy2log(ident.repeat(3, 0), 8, 2), at_step=0)
        # the same plans straight to the ranks (a frontend that skips the checks): each rank refuses them
        # alike and serves on; before, the first one raised in the rank and failed the step on every rank
        for bad, _ in _BAD_COMMANDS:
            dm.group.broadcast(m.PlacementCommand(at_step=dm.step_id, plan_json=json.dumps(bad)))
        got_tokens, _ = greedy(dm, steps=2)  # the ranks are still serving, on the running plan
        refused = dm.dispatch_stats()["placement_commands_refused"]
    finally:
        dm.close()
    assert got_tokens == want_tokens
    assert refused == 2 * len(_BAD_COMMANDS)  # both ranks answer, each counted every refusal
    err = capfd.readouterr().err
    for _, why in _BAD_COMMANDS:
        assert why in err, (why, err[-3000:])


def _doc(phy2log, num_ranks=2):
    return dict(num_ranks=num_ranks, phy2log=np.asarray(phy2log).tolist(), meta={})


# plan documents a PlacementCommand may carry for the tiny Mixtral on 2 ranks x 4 slots, and the refusal
_BAD_COMMANDS = [
    (_doc(np.r_[0, np.arange(7)][None].repeat(3, 0)), "plan: layer 0 expert 7 is not placed in any slot"),
    (_doc(np.arange(1, 9)[None].repeat(3, 0)), "phy2log ids must lie in [0, num_experts=8), got [1, 8]"),
    (_doc(np.arange(10)[None].repeat(3, 0) % 8), "plan has 3 layers on 2 ranks x 5 slots, the running one 3 on 2 x 4"),
    (_doc(np.arange(9)[None].repeat(3, 0) % 8), "P=9 slots must split evenly over num_ranks=2"),
    (_doc(np.arange(8)[None].repeat(2, 0)), "plan has 2 layers on 2 ranks x 4 slots, the running one 3 on 2 x 4"),
]


def test_plan_from_command_refuses_naming_the_field_and_the_limit():
    from moe_serve.distributed.runner import plan_from_command

    running = PlacementPlan.from_phy2log(np.arange(8)[None].repeat(3, 0), 8, 2)
    for doc, why in _BAD_COMMANDS + [(dict(phy2log=[[0]]), "must be an object with phy2log and num_ranks"),
                                     (_doc(np.arange(8)[None].repeat(3, 0), num_ranks="2"), "num_ranks must be an"),
                                     (dict(num_ranks=2, phy2log=[[0, 1.5]]), "phy2log holds non-integer values")]:
        with pytest.raises(ValueError) as info:
            plan_from_command(m.PlacementCommand(at_step=5, plan_json=json.dumps(doc)), running)
        assert str(info.value).startswith("placement command for step 5 refused: ") and why in str(info.value)
    with pytest.raises(ValueError, match="plan_json is not JSON"):
        plan_from_command(m.PlacementCommand(at_step=5, plan_json="{"), running)
    swapped = np.r_[np.arange(4, 8), np.arange(4)][None].repeat(3, 0)
    new = plan_from_command(m.PlacementCommand(at_step=5, plan_json=json.dumps(_doc(swapped))), running)
    assert new.phy2log.tolist() == swapped.tolist()
