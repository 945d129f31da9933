"""Data-parallel attention: a sequence lives on rank slot % dp, so each rank holds the KV rows of its own
sequences only (plus one padding row), not all num_slots of them; kv_cache.kv_cache_gb is the whole engine's."""
import pytest
import torch

from moe_serve.config import ModelConfig, ParallelConfig
from moe_serve.distributed.executor import DistributedModel
from moe_serve.models import load_model
from tests.distributed.helpers import greedy
from tests.models.tiny_checkpoints import make_tiny_checkpoint

PROMPTS = [[3, 4, 5, 6, 7], [9, 10, 11], [20, 21, 22, 23], [30], [40, 41]]  # slots 0..4, the last ones too


@pytest.mark.parametrize("family,dispatch", [("mixtral", "alltoall"), ("deepseek_v2", "allgather")])
def test_dp_ranks_hold_only_their_own_sequences_kv(tmp_path, family, dispatch):
    ckpt = make_tiny_checkpoint(family, tmp_path / family)
    ref = load_model(ckpt)
    ref.allocate_kv_cache(5, 64)
    want_tokens, want_logits = greedy(ref, prompts=PROMPTS, steps=4)
    row_bytes = 64 * ref.kv_bytes_per_token()  # one slot of max_len 64
    dm = DistributedModel(ModelConfig(model=str(ckpt)),
                          ParallelConfig(tp=1, ep=2, dispatch=dispatch, allreduce="gloo", threads_per_rank=1))
    try:
        dm.allocate_kv_cache(5, 64)
        got_tokens, got_logits = greedy(dm, prompts=PROMPTS, steps=4)
        per_rank = [s["kv_cache_bytes"] for s in dm.last_stats]
    finally:
        dm.close()
    assert got_tokens == want_tokens
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    # rank 0 owns slots 0, 2, 4 and rank 1 slots 1, 3 (+1 padding row each); before, each held all 5 (+1)
    assert sorted(per_rank) == [3 * row_bytes, 4 * row_bytes], (per_rank, row_bytes)
