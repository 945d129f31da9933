"""allocate_kv_cache on a DistributedModel whose ranks run started a second group and dropped the first: its ranks
ran on, owned by nobody (close() stops only the group it holds), each holding its shard, until the process ended."""
import psutil
import pytest

from moe_serve.config import ModelConfig, ParallelConfig
from moe_serve.distributed.executor import DistributedModel
from tests.distributed.helpers import greedy
from tests.models.tiny_checkpoints import make_tiny_checkpoint


def test_a_second_allocate_is_refused_and_leaves_no_ranks_behind(tmp_path):
    ckpt = make_tiny_checkpoint("mixtral", tmp_path / "mixtral")
    dm = DistributedModel(ModelConfig(model=str(ckpt)), ParallelConfig(tp=1, ep=2, allreduce="gloo", threads_per_rank=1))
    with pytest.raises(ValueError, match="num_slots >= 1 and max_len >= 1, got 0, 64"):  # before any rank starts
        dm.allocate_kv_cache(0, 64)
    assert dm.group is None
    pids = []
    try:
        dm.allocate_kv_cache(4, 64)
        pids = dm.group.pids()
        with pytest.raises(RuntimeError, match=r"worker ranks are running already \(4 slots x 64\)"):
            dm.allocate_kv_cache(2, 32)
        assert dm.group.pids() == pids  # the running ranks serve on
        greedy(dm, steps=2)
    finally:
        dm.close(grace_s=1)
    alive = [p for p in psutil.process_iter(["pid", "cmdline", "status"])
             if "moe_serve.distributed.worker" in " ".join(p.info["cmdline"] or []) and p.info["status"] != "zombie"
             and p.ppid() == __import__("os").getpid()]
    assert alive == [], alive  # old code: the first group's 2 ranks still running after close()
