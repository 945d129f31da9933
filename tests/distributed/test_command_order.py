"""switch_placement from a user thread while the step thread broadcasts step plans: every rank must see the two
messages in the same order, else one rank switches before a step that another one runs on the old plan (the
step's dispatch disagrees) or refuses the plan as too late while the others took it (the group fails)."""
import threading

import numpy as np
import torch

from moe_serve.config import ModelConfig, ParallelConfig
from moe_serve.distributed.executor import DistributedModel
from moe_serve.models import load_model
from placement.plan import PlacementPlan
from tests.distributed.helpers import greedy
from tests.models.tiny_checkpoints import make_tiny_checkpoint


def test_a_placement_switch_and_a_step_reach_every_rank_in_the_same_order(tmp_path):
    ckpt = make_tiny_checkpoint("mixtral", tmp_path / "mixtral")  # 8 experts, 3 MoE layers
    ref = load_model(ckpt)
    ref.allocate_kv_cache(4, 64)
    want_tokens, want_logits = greedy(ref, steps=3)
    dm = DistributedModel(ModelConfig(model=str(ckpt)),
                          ParallelConfig(tp=1, ep=2, allreduce="gloo", threads_per_rank=1, step_timeout_s=20))
    try:
        dm.allocate_kv_cache(4, 64)
        # the command's broadcast pauses after rank 0 (a real thread preempted between its sends) while the step
        # thread broadcasts step 0's plan; which thread's frame each rank got, in order
        order: dict[int, list[str]] = {0: [], 1: []}
        at_rank0, go = threading.Event(), threading.Event()
        send = dm.group._send

        def paused_send(r, frame, deadline, late):
            send(r, frame, deadline + 30, late)
            who = threading.current_thread().name
            order[r].append(who)
            if who == "user" and r == 0:
                at_rank0.set()
                go.wait(20)

        dm.group._send = paused_send
        swapped = PlacementPlan.from_phy2log(np.r_[np.arange(4, 8), np.arange(4)][None].repeat(3, 0), 8, 2)
        switched, served, errors = [], [], []

        def run(name, fn, out):
            def body():
                try:
                    out.append(fn())
                except Exception as exc:  # noqa: BLE001 - reported by the asserts below
                    errors.append((name, exc))
            return threading.Thread(target=body, name=name)

        user = run("user", lambda: dm.switch_placement(swapped), switched)  # at the next step: 0
        step = run("step", lambda: greedy(dm, steps=3), served)
        user.start()
        assert at_rank0.wait(20)
        step.start()
        for _ in range(100):  # the old code sent step 0's plan to both ranks meanwhile; now it waits for the command
            if order[1]:
                break
            threading.Event().wait(0.01)
        go.set()
        user.join(40)
        step.join(40)
        stats = dm.dispatch_stats()
    finally:
        dm.close()
    assert order[0] == order[1] and order[0][0] == "user", order
    assert not errors, errors
    assert switched == [0]
    tokens, logits = served[0]
    assert tokens == want_tokens
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    assert stats["rebalance_switches"] == 2  # summed over the two ranks: each switched once
