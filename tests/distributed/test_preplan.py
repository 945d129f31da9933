"""Pre-planned all-to-all dispatch (buffers sized from the previous step, no count exchange) gives the
same logits as one process, including a step that overflows the forecast (a prefill after decodes)."""
import torch

from moe_serve.config import ModelConfig, ParallelConfig
from moe_serve.distributed.executor import DistributedModel
from moe_serve.models import ForwardBatch, load_model
from tests.models.tiny_checkpoints import make_tiny_checkpoint


def batches():
    """prefill 2 sequences, 3 decode steps, then decodes plus a 6-token prefill of a third sequence."""
    yield ForwardBatch(token_ids=torch.tensor([3, 4, 5, 6, 9, 10]), positions=torch.tensor([0, 1, 2, 3, 0, 1]),
                       slot_ids=[0, 1], query_lens=[4, 2], context_lens=[0, 0])
    lens = [4, 2]
    for step in range(3):
        yield ForwardBatch(token_ids=torch.tensor([20 + step, 30 + step]), positions=torch.tensor(lens),
                           slot_ids=[0, 1], query_lens=[1, 1], context_lens=list(lens))
        lens = [x + 1 for x in lens]
    yield ForwardBatch(token_ids=torch.tensor([40, 41, 50, 51, 52, 53, 54, 55]),
                       positions=torch.tensor([lens[0], lens[1], 0, 1, 2, 3, 4, 5]),
                       slot_ids=[0, 1, 3], query_lens=[1, 1, 6], context_lens=[lens[0], lens[1], 0])


def test_preplanned_alltoall_matches_and_corrects_mispredictions(tmp_path):
    ckpt = make_tiny_checkpoint("deepseek_v3", tmp_path / "dsv3")  # 16 experts, top-4, group-limited routing
    ref = load_model(ckpt)
    ref.allocate_kv_cache(4, 64)
    want = [ref.forward(b) for b in batches()]
    dm = DistributedModel(ModelConfig(model=str(ckpt)),
                          ParallelConfig(tp=1, ep=2, dispatch="alltoall", preplan=True, allreduce="gloo",
                                         threads_per_rank=1))
    try:
        dm.allocate_kv_cache(4, 64)
        got = []
        for b in batches():
            got.append(dm.forward(b))
            stats = dm.dispatch_stats()
    finally:
        dm.close()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        assert torch.equal(g.argmax(-1), w.argmax(-1))
    moe_layers = ref.spec.num_moe_layers
    # both ranks report: the first step exchanged counts, the four others skipped it on every layer
    assert stats["preplan_count_exchanges"] == 2 * moe_layers
    assert stats["preplan_skipped"] == 2 * 4 * moe_layers
    assert stats["preplan_overflow_blocks"] > 0  # the last step's prefill overflowed the forecast
    assert stats["preplan_saved_s"] > 0
