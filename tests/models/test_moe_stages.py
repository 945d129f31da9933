"""The MoE fast path (router -> sort dispatch -> store.run -> combine) against the plain loops in
moe_serve.models.reference, a store plugged in without touching model code, and routing replay."""
from __future__ import annotations

import pytest
import torch

from moe_serve.experts import ExpertStore, ResidentExpertStore
from moe_serve.models import ForwardBatch, load_model
from moe_serve.models.hooks import RouterHooks
from moe_serve.models.moe import LocalDispatcher, Router
from moe_serve.models.reference import reference_moe, reference_route
from moe_serve.models.spec import ModelSpec, RopeSpec, RoutingSpec


def random_store(layers=2, e=6, h=16, i=12, seed=0) -> ResidentExpertStore:
    g = torch.Generator().manual_seed(seed)
    return ResidentExpertStore([torch.randn(e, 2 * i, h, generator=g) * 0.3 for _ in range(layers)],
                               [torch.randn(e, h, i, generator=g) * 0.3 for _ in range(layers)])


@pytest.mark.parametrize("n,k", [(1, 2), (7, 2), (33, 3), (5, 6)])
def test_dispatch_experts_combine_equals_reference(n, k):
    store = random_store()
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 16, generator=g)
    ids = torch.stack([torch.randperm(6, generator=g)[:k] for _ in range(n)])  # distinct per token
    w = torch.rand(n, k, generator=g)
    d = LocalDispatcher()
    x_sorted, counts, state = d.dispatch(x, ids, w, 6)
    assert sum(counts) == n * k and len(counts) == 6  # dropless: every copy kept
    out = d.combine(store.run(1, x_sorted, counts), state, x.dtype)
    torch.testing.assert_close(out.double(), reference_moe(x, ids, w, store, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [2, 4, 6])
def test_one_token_dispatch_is_bitwise_the_rank_order_sum(k):
    """Batch-1 decode skips the sort: its experts run in id order on the host and come back in rank
    order, so the result is exactly sum over ranks of w_r * expert_{id_r}(x), accumulated as combine does."""
    from moe_serve.experts.store import expert_forward

    store = random_store()
    g = torch.Generator().manual_seed(k)
    x = torch.randn(1, 16, generator=g)
    ids = torch.randperm(6, generator=g)[:k].sort(descending=True).values[None]  # ranks not in id order
    w = torch.rand(1, k, generator=g)
    d = LocalDispatcher()
    x_sorted, counts, state = d.dispatch(x, ids, w, 6)
    assert counts == [int((ids == e).sum()) for e in range(6)]
    out = d.combine(store.run(0, x_sorted, counts), state, x.dtype)
    per_rank = torch.cat([expert_forward(x, *store.get(0, e)) for e in ids[0].tolist()]) * w.reshape(k, 1)
    assert torch.equal(out, per_rank.view(1, k, -1).sum(dim=1))


ROUTINGS = {
    "mixtral": RoutingSpec(top_k=2, norm_topk_prob=True),
    "qwen": RoutingSpec(top_k=4, norm_topk_prob=False, weights_fp32=False),
    "v2_group": RoutingSpec(top_k=3, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                            routed_scaling_factor=16.0, logits_fp32=True),
    "v3": RoutingSpec(top_k=4, scoring="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2, has_bias=True,
                      norm_topk_prob=True, routed_scaling_factor=2.5, logits_fp32=True),
}


@pytest.mark.parametrize("name", sorted(ROUTINGS))
def test_router_equals_reference(name):
    r = ROUTINGS[name]
    spec = ModelSpec(family="t", architecture="t", num_layers=1, hidden_size=16, vocab_size=8, num_heads=1,
                     num_kv_heads=1, head_dim=16, v_head_dim=16, num_experts=16, top_k=r.top_k, moe_layers=(0,),
                     moe_intermediate_size=8, intermediate_size=8, routing=r, rope=RopeSpec(dim=16),
                     rms_norm_eps=1e-6, max_position_embeddings=64)
    router = Router(spec)
    g = torch.Generator().manual_seed(1)
    router.weight.data = torch.randn(16, 16, generator=g)
    if r.has_bias:
        router.e_score_correction_bias.data = torch.rand(16, generator=g) * 0.3
    x = torch.randn(40, 16, generator=g)
    ids, w = router(x)
    ref_ids, ref_w = reference_route(x @ router.weight.T, r, getattr(router, "e_score_correction_bias", None))
    order = ids.argsort(dim=-1)
    assert ids.gather(1, order).tolist() == ref_ids
    torch.testing.assert_close(w.gather(1, order).double(), torch.tensor(ref_w, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)


class CountingStore(ExpertStore):
    """A different store behind the same interface: weights fetched one expert at a time from the
    checkpoint source (as an offloading store would), with begin/end bookkeeping."""

    def __init__(self, source):
        self.source, self.num_moe_layers, self.num_experts = source, source.num_moe_layers, source.num_experts
        self.device, self.fetched, self.open = torch.device("cpu"), 0, set()

    def begin_layer(self, moe_layer, expert_ids, rows=None):
        assert moe_layer not in self.open
        self.open.add(moe_layer)

    def end_layer(self, moe_layer):
        self.open.remove(moe_layer)

    def get(self, moe_layer, e):
        assert moe_layer in self.open, "get outside begin_layer/end_layer"
        self.fetched += 1
        return self.source.get(moe_layer, e)


def test_another_store_plugs_in_without_model_changes(tiny_checkpoint):
    d = tiny_checkpoint("qwen2_moe")
    holder = {}

    def factory(spec, source, dtype, device):
        holder["store"] = CountingStore(source)
        return holder["store"]

    ids = list(range(3, 20))
    base = load_model(d)
    base.allocate_kv_cache(1, 32)
    other = load_model(d, expert_store_factory=factory)
    other.allocate_kv_cache(1, 32)
    torch.testing.assert_close(other(ForwardBatch.single(ids)), base(ForwardBatch.single(ids)))
    assert holder["store"].fetched > 0 and not holder["store"].open


class Replay(RouterHooks):
    active = True

    def route(self, moe_layer, hidden, expert_ids, weights):
        n = hidden.shape[0]
        return torch.tensor([[0, 1]] * n), torch.full((n, 2), 0.5, dtype=weights.dtype)


def test_hook_can_replace_routing(tiny_checkpoint):
    m = load_model(tiny_checkpoint("mixtral"))
    m.allocate_kv_cache(1, 32)
    plain = m(ForwardBatch.single([5, 6, 7]))
    m.hooks = Replay()
    replayed = m(ForwardBatch.single([5, 6, 7]))
    assert not torch.allclose(plain, replayed)
