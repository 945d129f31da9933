"""Ranks that disagree on which sequences each returns (a rank out of step with the others) raised a WorkerFailure
for that step only: the group stayed open, the next step served (from ranks whose state can no longer be trusted),
/health said ok. It now fails the group as a dead rank does, with an error naming the ranks and what they returned."""
import time

import psutil
import pytest

from moe_serve.config import ModelConfig, ParallelConfig
from moe_serve.distributed.executor import DistributedModel
from moe_serve.distributed.launcher import WorkerFailure
from tests.distributed.helpers import greedy
from tests.models.tiny_checkpoints import make_tiny_checkpoint


def _gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_ranks_disagreeing_on_the_split_fail_the_group_like_a_dead_rank(tmp_path):
    ckpt = make_tiny_checkpoint("mixtral", tmp_path / "mixtral")
    # tp=1, ep=2: data-parallel attention, slot s on rank s % 2; rank 1 leaves out its last sequence at step 1
    dm = DistributedModel(ModelConfig(model=str(ckpt)), ParallelConfig(tp=1, ep=2, allreduce="gloo", threads_per_rank=1),
                          faults={1: "drop_output_at_step:1"})
    try:
        dm.allocate_kv_cache(4, 64)
        pids = dm.group.pids()
        with pytest.raises(WorkerFailure) as info:
            greedy(dm, steps=3)
        text = str(info.value)
        assert "step 1: the ranks disagree" in text and "{1: []}" in text, text  # sequence 1 (slot 1) by no rank
        assert "rank 0 returned [0, 2]; rank 1 returned []" in text, text
        assert dm.failure() == text  # /health's 503 reads this (old code: None, health 200)
        with pytest.raises(WorkerFailure):  # every later step fails at once (old code: step 2 served)
            greedy(dm, steps=1)
        with pytest.raises(WorkerFailure, match="step 1: the ranks disagree"):  # not a bare 'ranks are not running'
            dm.switch_placement(dm.plan)
        deadline = time.monotonic() + 10
        while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(p) for p in pids)  # the ranks are stopped (old code: running on)
    finally:
        dm.close(grace_s=0.5)
