"""Pre-planned all-to-all with its forecast from a `predictors` predictor (parallel.preplan_predictor):
the same greedy tokens as the plain all-to-all, and counters that add up (layer 0 of the first step
exchanges counts; every later layer-step skips it, all but layer 0 on the predictor's forecast)."""
import numpy as np
import pytest
import torch

from moe_serve.config import ModelConfig, ParallelConfig
from moe_serve.distributed.executor import DistributedModel
from moe_serve.distributed.forecast import RoutingLog, load_forecaster
from moe_serve.models import load_model
from moe_serve.tracing.recorder import TraceRecorder
from placement.algorithms.simple import contiguous
from predictors import make_predictor
from tests.distributed.helpers import greedy
from tests.models.tiny_checkpoints import make_tiny_checkpoint

FIT_PROMPTS = [[7, 8, 9, 10], [30, 31], [12, 2, 44, 5, 6], [60, 61, 62]]  # not the test's prompts
STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny DeepSeek-V3 checkpoint, a transition predictor fitted on its routing of other prompts."""
    tmp = tmp_path_factory.mktemp("pp")
    ckpt = make_tiny_checkpoint("deepseek_v3", tmp / "dsv3")  # 16 experts, top-4, group-limited routing
    probe = load_model(ckpt)
    s = probe.spec
    rec = TraceRecorder(s.num_moe_layers, s.num_experts, s.top_k)
    model = load_model(ckpt, hooks=rec)
    model.allocate_kv_cache(4, 64)
    greedy(model, FIT_PROMPTS, steps=12)
    pred = make_predictor("transition", s.num_moe_layers, s.num_experts, s.top_k, lookahead=1).fit([rec.to_trace()])
    path = tmp / "transition.safetensors"
    pred.save(path)
    return ckpt, path, s


def run(ckpt, **parallel):
    dm = DistributedModel(ModelConfig(model=str(ckpt)),
                          ParallelConfig(tp=1, ep=2, dispatch="alltoall", allreduce="gloo", threads_per_rank=1,
                                         **parallel))
    try:
        dm.allocate_kv_cache(4, 64)
        tokens, logits = greedy(dm, steps=STEPS)
        return tokens, logits, dm.dispatch_stats()
    finally:
        dm.close()


@pytest.mark.limit(150)
def test_predictor_forecast_matches_plain_alltoall(setup):
    ckpt, path, spec = setup
    want_tokens, want_logits, _ = run(ckpt)
    got_tokens, got_logits, st = run(ckpt, preplan=True, preplan_predictor=str(path))
    assert got_tokens == want_tokens
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)
    L, ranks = spec.num_moe_layers, 2
    assert st["preplan_count_exchanges"] == ranks * 1  # layer 0 of the first step only
    assert st["preplan_skipped"] == ranks * (STEPS * L - 1)
    assert st["preplan_predictor_skipped"] == ranks * STEPS * (L - 1)  # every layer but 0, first step included
    assert 0 <= st["preplan_predictor_overflow_blocks"] <= st["preplan_overflow_blocks"]
    assert 0 <= st["preplan_predictor_padding_rows"] <= st["preplan_padding_rows"]
    assert st["preplan_predict_s"] > 0
    assert st["preplan_predictor_saved_s"] == pytest.approx(
        st["preplan_saved_s"] * st["preplan_predictor_skipped"] / st["preplan_skipped"])


def test_forecast_counts_rows_per_rank(setup):
    """RoutingLog.forecast: distinct (token, rank) pairs of the predictor's top-k, through the plan."""
    ckpt, path, s = setup
    pred = load_forecaster(str(path), s.num_moe_layers, s.num_experts, s.top_k)
    plan = contiguous(np.ones((s.num_moe_layers, s.num_experts)), 2, s.num_experts // 2)
    log = RoutingLog(pred, s.num_moe_layers, s.top_k)
    n = 5
    log.begin(n)
    ids = torch.stack([torch.randperm(s.num_experts)[:s.top_k] for _ in range(n)])
    stats = dict(predict_s=0.0)
    got = log.forecast(0, ids, torch.full((n, s.top_k), 0.25), torch.zeros(n, 8), plan, stats)
    top = pred.predict(log_state(log), 0)[:, 0].topk(s.top_k).indices
    ranks = top // (s.num_experts // 2)  # contiguous, no replicas
    want = torch.stack([(ranks == r).any(-1).sum() for r in range(2)])
    assert torch.equal(got, want) and int(got.sum()) >= n
    assert log.forecast(s.num_moe_layers - 1, ids, torch.full((n, s.top_k), 0.25), torch.zeros(n, 8), plan,
                        stats) is None
    with pytest.raises(ValueError, match="preplan_predictor"):
        load_forecaster(str(path), s.num_moe_layers, s.num_experts + 1, s.top_k)


def log_state(log):
    from predictors import RoutingState

    return RoutingState(experts=log.experts, weights=log.weights, prev_experts=log.prev_experts,
                        prev_weights=log.prev_weights)
