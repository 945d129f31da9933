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
        assert len(shm_files("127.0.0.1", port)) == 2  # one shm buffer per rank while serving
        got_tokens, got_logits = greedy(dm, steps=4)
    finally:
        dm.close()
    assert got_tokens == want_tokens
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    assert shm_files("127.0.0.1", port) == []  # DeepSpeed's /dev/shm files are removed on close
