"""A command the ranks refuse comes back to whoever issued it as a ValueError naming the field and the reason
(every rank refuses alike), and serving goes on as before."""
import json

import numpy as np
import pytest

from moe_serve.config import ModelConfig, ParallelConfig
from moe_serve.distributed import messages as m
from moe_serve.distributed.executor import DistributedModel
from moe_serve.distributed.launcher import WorkerGroup
from moe_serve.models import ForwardBatch, load_model
from placement.plan import PlacementPlan
from tests.distributed.helpers import greedy
from tests.distributed.test_control import _keeps_serving_then_stops_cleanly, _spec
from tests.distributed.test_rebalance import _BAD_COMMANDS, _doc
from tests.models.tiny_checkpoints import make_tiny_checkpoint


def test_a_refused_placement_command_is_reported_to_its_issuer(tmp_path):
    ckpt = make_tiny_checkpoint("mixtral", tmp_path / "mixtral")  # 8 experts, 3 MoE layers
    ref = load_model(ckpt)
    ref.allocate_kv_cache(4, 64)
    want_tokens, _ = greedy(ref, steps=4)
    dm = DistributedModel(ModelConfig(model=str(ckpt)), ParallelConfig(tp=1, ep=2, allreduce="gloo", threads_per_rank=1))
    refusals = []
    try:
        dm.allocate_kv_cache(4, 64)

        def before(step):
            if step == 1:  # a plan the ranks refuse (sent past the frontend's checks): the issuer hears why
                for doc, why in _BAD_COMMANDS:
                    with pytest.raises(ValueError) as info:
                        dm.group.command(m.PlacementCommand(at_step=dm.step_id, plan_json=json.dumps(doc)), 30)
                    refusals.append((str(info.value), why))
                with pytest.raises(ValueError) as info:  # a step already run: the plan would wait forever
                    dm.group.command(m.PlacementCommand(at_step=0, plan_json=json.dumps(_doc(np.arange(8)[None]
                                                                                              .repeat(3, 0)))), 30)
                refusals.append((str(info.value), "at_step=0 is not after the last step run (0)"))
            if step == 2:  # a plan they take: switch_placement returns once every rank has it
                swapped = np.r_[np.arange(4, 8), np.arange(4)][None].repeat(3, 0)
                assert dm.switch_placement(PlacementPlan.from_phy2log(swapped, 8, 2)) == dm.step_id

        got_tokens, _ = greedy(dm, steps=4, kill=before)  # serving goes on, on the running plan, then the new one
        stats = dm.dispatch_stats()
    finally:
        dm.close()
    assert got_tokens == want_tokens
    assert stats["rebalance_switches"] == 2 and stats["placement_commands_refused"] == 2 * len(refusals)
    for text, why in refusals:
        assert text.startswith("placement command for step ") and " refused: " in text, text
        assert why in text and text.endswith("(refused by ranks [0, 1]; they serve on as before)"), text


def test_a_refused_cache_command_is_reported_to_its_issuer():
    group = WorkerGroup(_spec(1, 2), world_size=2, startup_timeout_s=60, heartbeat_timeout_s=20)
    with pytest.raises(ValueError, match=r"^probe runner: command CacheCommand is not supported \(refused by ranks "
                                         r"\[0, 1\]; they serve on as before\)$"):
        group.command(m.CacheCommand("prefetch", 0, [1, 2]), 30)
    _keeps_serving_then_stops_cleanly(group)


def test_switch_placement_by_default_applies_at_the_next_step_boundary(tmp_path):
    """The default step used to be chosen by the frontend (its next step id) before the command went out: a step
    thread's plan sent in between made every rank refuse it as too late. Now the ranks take the next step they run."""
    ckpt = make_tiny_checkpoint("mixtral", tmp_path / "mixtral")
    ref = load_model(ckpt)
    ref.allocate_kv_cache(4, 64)
    want_tokens, _ = greedy(ref, steps=3)
    dm = DistributedModel(ModelConfig(model=str(ckpt)), ParallelConfig(tp=1, ep=2, allreduce="gloo", threads_per_rank=1))
    try:
        dm.allocate_kv_cache(4, 64)
        command = dm.group.command

        def step_first(msg, timeout_s):  # the step thread's plan goes out between the choice of step and the command
            dm.forward(ForwardBatch.single([7, 8, 9], slot=3))  # step 0, in a slot greedy does not use
            return command(msg, timeout_s)

        dm.group.command = step_first
        swapped = np.r_[np.arange(4, 8), np.arange(4)][None].repeat(3, 0)
        assert dm.switch_placement(PlacementPlan.from_phy2log(swapped, 8, 2)) == 1 == dm.step_id
        # the frontend's plan is the one in force, from that step (old code: still the start-up plan)
        assert (dm.plan.phy2log == swapped).all() and dm.plan_since_step == 1
        dm.group.command = command
        got_tokens, _ = greedy(dm, steps=3)  # steps 1..3, the first on the new plan
        stats = dm.dispatch_stats()
    finally:
        dm.close()
    assert got_tokens == want_tokens
    assert stats["rebalance_switches"] == 2 and stats["placement_commands_refused"] == 0  # each rank switched once
