"""TP, EP and TP+EP on 2 CPU ranks (gloo) give the single-process greedy tokens and logits.

One worker group per case (each costs a few seconds of startup); the cases cover every family's
peculiarity once: GQA + plain MoE (Mixtral), shared expert with its sigmoid gate and qkv bias
(Qwen2-MoE), q/k norm over the whole projection (OLMoE, the sharded RMSNorm), MLA with a dense
first layer and shared experts (DeepSeek-V2), group-limited routing with a score bias (DeepSeek-V3),
per-head q/k norm with YaRN (Qwen3-MoE), and both dispatch modes under data-parallel attention.
"""
import pytest
import torch

from moe_serve.config import ModelConfig, ParallelConfig
from moe_serve.distributed.executor import DistributedModel
from moe_serve.models import load_model
from tests.distributed.helpers import greedy
from tests.models.tiny_checkpoints import make_tiny_checkpoint

CASES = [  # family, tp, ep, dispatch (Mixtral runs in test_engine_parallel with tp=2, ep=2)
    ("qwen2_moe", 2, 1, "auto"),  # pure TP: experts split along their intermediate dim; gated shared expert
    ("olmoe", 2, 2, "auto"),  # TP attention (sharded full q/k norm) + EP (all-gather / reduce-scatter)
    ("deepseek_v2", 2, 2, "auto"),  # MLA heads split, dense first layer, shared experts
    ("deepseek_v3", 1, 2, "alltoall"),  # EP with data-parallel attention, all-to-all dispatch
    ("qwen3_moe", 1, 2, "allgather"),  # EP with data-parallel attention, all-gather dispatch
]


@pytest.mark.parametrize("family,tp,ep,dispatch", CASES, ids=[f"{c[0]}-tp{c[1]}-ep{c[2]}-{c[3]}" for c in CASES])
def test_distributed_matches_one_process(tmp_path, family, tp, ep, dispatch):
    ckpt = make_tiny_checkpoint(family, tmp_path / family)
    ref = load_model(ckpt)
    ref.allocate_kv_cache(4, 64)
    want_tokens, want_logits = greedy(ref)
    dm = DistributedModel(ModelConfig(model=str(ckpt)),
                          ParallelConfig(tp=tp, ep=ep, dispatch=dispatch, allreduce="gloo", threads_per_rank=1))
    try:
        dm.allocate_kv_cache(4, 64)
        got_tokens, got_logits = greedy(dm)
        stats = dm.dispatch_stats()
    finally:
        dm.close()
    assert got_tokens == want_tokens
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    # every decode token-layer was dispatched once and touched between 1 and min(k, ranks) ranks
    moe_layers = ref.spec.num_moe_layers
    assert stats["dispatch_tokens"] == 3 * moe_layers
    assert 3 * moe_layers <= stats["dispatch_copies"] <= 3 * moe_layers * min(ref.spec.top_k, ep)


@pytest.mark.skipif(not __import__("moe_serve.distributed.executor", fromlist=["x"]).shm_allreduce_built(),
                    reason="DeepSpeed's CPU shm all-reduce is not installed and built (pip install deepspeed; "
                           "python benches/allreduce.py builds it)")
def test_tp_with_deepspeed_shm_allreduce(tmp_path):
    from moe_serve.distributed.comm import shm_files

    ckpt = make_tiny_checkpoint("mixtral", tmp_path / "mixtral")
    ref = load_model(ckpt)
    ref.allocate_kv_cache(4, 64)
    want_tokens, want_logits = greedy(ref, steps=4)
    dm = DistributedModel(ModelConfig(model=str(ckpt)),
                          ParallelConfig(tp=2, ep=1, allreduce="deepspeed", threads_per_rank=1))
    try:
        dm.allocate_kv_cache(4, 64)
        port = dm._shm_port
        for pid in dm.group.pids():  # every rank maps both ranks' shm buffers while serving, whose names are
            maps = open(f"/proc/{pid}/maps").read()  # already removed: nothing is left if a process is killed
            assert len({ln.split()[-2] for ln in maps.splitlines() if f"_{port}_" in ln}) == 2, maps
        assert shm_files("127.0.0.1", port) == []
        got_tokens, got_logits = greedy(dm, steps=4)
    finally:
        dm.close()
    assert got_tokens == want_tokens
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    assert shm_files("127.0.0.1", port) == []  # DeepSpeed's /dev/shm files are removed on close


@pytest.mark.skipif(not __import__("moe_serve.distributed.executor", fromlist=["x"]).shm_allreduce_built(),
                    reason="DeepSpeed's CPU shm all-reduce is not installed and built")
def test_deepspeed_shm_files_outlive_no_failure(tmp_path):
    # DeepSpeed's two /dev/shm buffers (66 MB each) must not be left behind by a rank failing at start-up
    # (a truncated checkpoint) nor by a frontend killed with SIGKILL (its ranks die with it, nobody cleans up)
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from moe_serve.distributed.comm import shm_files
    from moe_serve.distributed.launcher import WorkerFailure

    ckpt = make_tiny_checkpoint("mixtral", tmp_path / "mixtral")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ckpt.iterdir():
        (bad / f.name).write_bytes(f.read_bytes()[:100] if f.suffix == ".safetensors" else f.read_bytes())
    pc = ParallelConfig(tp=2, ep=1, allreduce="deepspeed", threads_per_rank=1)
    dm = DistributedModel(ModelConfig(model=str(bad)), pc)
    with pytest.raises(WorkerFailure, match="not a readable safetensors file"):
        dm.allocate_kv_cache(4, 64)
    port = dm._shm_port
    left = shm_files("127.0.0.1", port)
    dm.close()
    assert left == []

    script = ("import time\nfrom moe_serve.config import ModelConfig, ParallelConfig\n"
              "from moe_serve.distributed.executor import DistributedModel\n"
              f"dm = DistributedModel(ModelConfig(model={str(ckpt)!r}), ParallelConfig(tp=2, ep=1, "
              "allreduce='deepspeed', threads_per_rank=1))\n"
              "dm.allocate_kv_cache(4, 64)\nprint(dm.group.endpoints.tmpdir, dm._shm_port, *dm.group.pids(), flush=True)\ntime.sleep(120)\n")
    front = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    tmpdir, port, *pids = front.stdout.readline().split()
    try:
        front.send_signal(signal.SIGKILL)
        front.wait()
        deadline = time.monotonic() + 20
        while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(os.path.exists(f"/proc/{p}") for p in pids), "the ranks outlived their frontend"
        assert shm_files("127.0.0.1", port) == []
    finally:
        for f in shm_files("127.0.0.1", port):
            os.remove(f)
        shutil.rmtree(tmpdir, ignore_errors=True)  # the killed frontend's control sockets
