"""Predictors fitted with hidden states need them at predict time, and say so: an mlp fitted on traces
that carry hidden states (its default, use_hidden) read state.hidden unconditionally but declared
needs_hidden False, so callers that pass hidden states only to predictors that need them (the EP
dispatch forecast, predict eval on test traces without them, cache-sim) got an AttributeError."""
import numpy as np
import pytest
import torch

from moe_serve.cli.main import main
from predictors.base import RoutingState
from predictors.registry import load_predictor, make_predictor
from predictors.traces import RoutingTrace
from tests.predictors.synth import router_trace


def _without_hidden(t: RoutingTrace) -> RoutingTrace:
    return RoutingTrace(t.experts, t.weights, t.seq_offsets, t.num_experts)


@pytest.mark.parametrize("name", ["mlp", "mlp_online"])
def test_an_mlp_fitted_with_hidden_states_needs_them(name, tmp_path):
    trace, _ = router_trace(tokens=100, L=3, E=8, K=2, H=8, seqs=4)
    pred = make_predictor(name, 3, 8, 2, 1, epochs=1, dim=8).fit([trace])
    assert pred.needs_hidden
    state = RoutingState.from_trace(_without_hidden(trace), 1)
    with pytest.raises(ValueError, match=f"^{name}: needs state.hidden"):  # was: AttributeError on None.float()
        pred.predict(state, 1)
    pred.save(tmp_path / "p.safetensors")
    assert load_predictor(tmp_path / "p.safetensors").needs_hidden
    plain = make_predictor(name, 3, 8, 2, 1, epochs=1, dim=8).fit([_without_hidden(trace)])
    assert not plain.needs_hidden and plain.predict(state, 1).shape == (100, 1, 8)
    off = make_predictor(name, 3, 8, 2, 1, epochs=1, dim=8, use_hidden=False).fit([trace])
    assert not off.needs_hidden


def test_eval_with_hidden_states_in_train_only_fits_without_them(tmp_path, capsys):
    trace, _ = router_trace(tokens=100, L=3, E=8, K=2, H=8, seqs=4)
    train, test = tmp_path / "train.npz", tmp_path / "test.npz"
    trace.save(train)
    _without_hidden(router_trace(tokens=60, L=3, E=8, K=2, H=8, seqs=3, seed=1)[0]).save(test)
    rc = main(["predict", "eval", "--train", str(train), "--test", str(test), "--predictors", "mlp,router",
               "--params", '{"mlp": {"epochs": 1, "dim": 8}}'])
    out = capsys.readouterr().out
    assert rc == 0 and "mlp          lookahead_1" in out and "router       skipped: needs hidden states" in out


def test_the_expert_cache_refuses_a_predictor_that_needs_hidden_states(tiny_checkpoint, tmp_path):
    # the expert cache gives its predictor routing only: such a predictor was loaded, and then every
    # request failed ('needs state.hidden' / AttributeError in each step, finish_reason 'error')
    from moe_serve import LLM
    from predictors.router import RouterPredictor, router_weights_from_checkpoint

    path = tiny_checkpoint("mixtral")  # 3 MoE layers, 8 experts, top-2, hidden 64
    router = tmp_path / "router.safetensors"
    RouterPredictor.from_router_weights(router_weights_from_checkpoint(path, 8), 2, 1).save(router)
    trace, _ = router_trace(tokens=60, L=3, E=8, K=2, H=64, seqs=3)
    mlp = tmp_path / "mlp.safetensors"
    make_predictor("mlp", 3, 8, 2, 1, epochs=1, dim=8).fit([trace]).save(mlp)
    for pred, name in ((router, "router"), (mlp, "mlp")):
        with pytest.raises(ValueError, match=f"expert_cache.predictor: {pred} \\({name}\\) predicts from hidden states"):
            LLM(model=str(path), dtype="float32", kv_cache_gb=0.01, expert_cache_slots=4, cpu_experts="off",
                predictor=str(pred), cache_policy="predicted")
    routing_only = tmp_path / "plain.safetensors"
    make_predictor("mlp", 3, 8, 2, 1, epochs=1, dim=8, use_hidden=False).fit([trace]).save(routing_only)
    with LLM(model=str(path), dtype="float32", kv_cache_gb=0.01, expert_cache_slots=4, cpu_experts="off",
             predictor=str(routing_only), cache_policy="predicted") as llm:
        from moe_serve import SamplingParams

        out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        assert len(out[0].token_ids) == 3


@pytest.mark.parametrize("name", ["router", "hidden_linear", "mlp"])
def test_hidden_states_of_another_size_are_refused_naming_both(name):
    # a predictor fitted on one model's hidden states, asked with another's: a torch matmul shape error
    trace, _ = router_trace(tokens=60, L=3, E=8, K=2, H=8, seqs=3)
    other, _ = router_trace(tokens=20, L=3, E=8, K=2, H=16, seqs=2)
    pred = make_predictor(name, 3, 8, 2, 1, **({"steps": 2} if name != "mlp" else {"epochs": 1, "dim": 8})).fit([trace])
    with pytest.raises(ValueError, match=f"^{name}: fitted on hidden size 8, state.hidden has 16"):
        pred.predict(RoutingState.from_trace(other, 0), 0)
    assert pred.predict(RoutingState.from_trace(trace, 0), 0).shape == (60, 1, 8)


@pytest.mark.parametrize("name", ["mlp", "router", "hidden_linear"])
def test_fit_on_traces_with_hidden_states_of_different_sizes_names_them(name):
    # was: torch.cat's 'Sizes of tensors must match' from inside fit
    a, _ = router_trace(tokens=40, L=3, E=8, K=2, H=8, seqs=2)
    b, _ = router_trace(tokens=40, L=3, E=8, K=2, H=16, seqs=2)
    with pytest.raises(ValueError, match=f"^{name}: trace 1 has hidden states of size 16, trace 0 of size 8"):
        make_predictor(name, 3, 8, 2, 1).fit([a, b])
