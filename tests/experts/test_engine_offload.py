"""The engine builds the offloading store from its config, and the predictor prefetches through it."""
from __future__ import annotations

import numpy as np
import pytest

from moe_serve import LLM, SamplingParams
from moe_serve.experts.offload import OffloadExpertStore
from predictors.baselines import TransitionPredictor
from predictors.traces import RoutingTrace

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = [[5, 17, 3, 99, 42], [7, 64, 12]]


def tokens(llm):
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


def test_llm_with_expert_cache_matches_resident(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("mixtral")  # 3 MoE layers x 8 experts, top-2
    ref = tokens(LLM(model=str(path), dtype="float32", kv_cache_gb=0.01))
    rng = np.random.default_rng(0)
    ex = np.stack([rng.permutation(8)[:2] for _ in range(300 * 3)]).reshape(300, 3, 2).astype(np.int16)
    trace = RoutingTrace(experts=ex, weights=np.ones_like(ex, dtype=np.float16), seq_offsets=np.array([0, 300]),
                         num_experts=8)
    pred_path = tmp_path / "transition.safetensors"
    TransitionPredictor(3, 8, 2, lookahead=1).fit([trace]).save(pred_path)
    llm = LLM(model=str(path), dtype="float32", kv_cache_gb=0.01, expert_cache_slots=5,
              cache_policy="predicted-prefetch", predictor=str(pred_path), cpu_experts="off")
    store = llm.engine.model.store
    assert isinstance(store, OffloadExpertStore) and store.routing_hook is not None
    assert tokens(llm) == ref
    m = store.metrics()
    assert m["prefetch_issued"] > 0 and m["misses"] > 0 and m["capacity"] == 5
    worker = store.copier._thread
    assert worker.is_alive()
    llm.close()  # closing the engine closes its store: the copy thread is joined, not left to the collector
    assert not worker.is_alive()


def test_bad_expert_cache_options_name_the_field(tiny_checkpoint):
    path = str(tiny_checkpoint("mixtral"))
    with pytest.raises(ValueError, match="expert_cache.cpu_experts"):
        LLM(model=path, expert_cache_slots=4, cpu_experts="sometimes")
    with pytest.raises(ValueError, match="needs expert_cache.predictor"):
        LLM(model=path, dtype="float32", kv_cache_gb=0.01, expert_cache_slots=4, cache_policy="static")
    with pytest.raises(ValueError, match="holds no expert"):
        LLM(model=path, dtype="float32", kv_cache_gb=0.01, expert_cache_gb=1e-9)


def test_a_predictor_path_that_is_no_predictor_names_the_field(tiny_checkpoint, tmp_path):
    """A missing file, a text file, a truncated one: a ValueError naming the option and the file,
    not safetensors' bare 'header too large'."""
    path = str(tiny_checkpoint("mixtral"))
    text = tmp_path / "notes.txt"
    text.write_text("not a predictor\n" * 100)
    ex = np.tile(np.array([[[0, 1], [2, 3], [4, 5]]], dtype=np.int16), (20, 1, 1))  # [20 tokens, 3 layers, 2]
    trace = RoutingTrace(experts=ex, weights=np.ones_like(ex, dtype=np.float16), seq_offsets=np.array([0, 20]),
                         num_experts=8)
    cut = tmp_path / "cut.safetensors"
    TransitionPredictor(3, 8, 2, lookahead=1).fit([trace]).save(cut)
    cut.write_bytes(cut.read_bytes()[:-20])
    for bad, says in ((tmp_path / "missing.safetensors", "does not exist"), (text, "not a readable safetensors"),
                      (cut, "not a readable safetensors")):
        with pytest.raises(ValueError, match=f"expert_cache.predictor: predictor file {bad}: .*{says}|"
                                             f"expert_cache.predictor: predictor file {bad} {says}"):
            LLM(model=path, dtype="float32", kv_cache_gb=0.01, expert_cache_slots=4, cpu_experts="off",
                predictor=str(bad))


@pytest.mark.parametrize("learning", ["background", "inline"])
def test_adaptive_predictor_learns_from_served_routing(tiny_checkpoint, tmp_path, learning):
    """mlp_online keeps learning from the routing the engine serves (every `predictor_learn_every`
    tokens, on a worker thread or in the step), and that never changes the tokens; with
    predictor_learn_every=0 it stays as fitted."""
    import threading

    import torch

    from predictors.online import OnlineMLPPredictor

    path = tiny_checkpoint("mixtral")  # 3 MoE layers x 8 experts, top-2
    ref = tokens(LLM(model=str(path), dtype="float32", kv_cache_gb=0.01))
    rng = np.random.default_rng(1)
    ex = np.stack([rng.permutation(8)[:2] for _ in range(200 * 3)]).reshape(200, 3, 2).astype(np.int16)
    trace = RoutingTrace(experts=ex, weights=np.full(ex.shape, 0.5, dtype=np.float16), seq_offsets=np.array([0, 200]),
                         num_experts=8)
    pred_path = tmp_path / "online.safetensors"
    OnlineMLPPredictor(3, 8, 2, lookahead=1, epochs=1, dim=16).fit([trace]).save(pred_path)
    for every, learns in ((4, True), (0, False)):
        llm = LLM(model=str(path), dtype="float32", kv_cache_gb=0.01, expert_cache_slots=5, cache_policy="predicted",
                  predictor=str(pred_path), cpu_experts="off", predictor_learn_every=every,
                  predictor_learning=learning)
        store = llm.engine.model.store
        predictor = store.policy.predictor
        before = [p.detach().clone() for p in predictor.net.parameters()]
        assert tokens(llm) == ref
        if learning == "background" and learns:
            assert store.learner is not predictor and store.learner.flush(timeout=60)
            observed = store.learner.trainer.observed  # the worker's copy learns; the policy's adopts its nets
        else:
            observed = predictor.observed
        changed = any(not torch.equal(a, b) for a, b in zip(before, predictor.net.parameters()))
        assert changed == learns
        # 8 prompt tokens + 2 x 7 decoded tokens have full routing by the end
        assert (observed >= 16) == learns and (observed == 0) != learns
        llm.close()
        assert not any(t.name == "moe-serve-predictor-learner" for t in threading.enumerate())


def test_failing_learner_is_dropped_and_the_step_goes_on(caplog):
    import torch

    from moe_serve.experts.prefetch import RoutingHook
    from moe_serve.models.batch import ForwardBatch

    class Broken:
        calls = 0

        def observe(self, *tensors):
            Broken.calls += 1
            raise RuntimeError("boom")

    hook = RoutingHook(num_layers=2, top_k=2, learner=Broken(), learn_every=3)
    batch = ForwardBatch.single([4, 5, 6, 7])
    with torch.inference_mode():
        hook.begin_step(batch)
        for layer in range(2):
            hook.route(layer, None, torch.tensor([[0, 1]] * 4), torch.full((4, 2), 0.5))
        hook.end_step(batch)  # 4 rows >= 3: observe is called, raises, and is caught
    assert Broken.calls == 1 and hook.learner is None
    assert "stopped learning online" in caplog.text
    assert hook.state(1).experts.shape == (4, 2, 2)  # the hook still serves predictions
