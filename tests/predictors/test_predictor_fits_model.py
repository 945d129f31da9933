"""A predictor file used for a model (the expert cache) or a trace (cache-sim) is refused when it was fitted
for another top_k, or needs hidden states the trace lacks, naming the option and both values: it was
accepted, and prefetched (and weighted its forecast by) the wrong number of experts per token, or
failed inside the replay."""
import pytest

from moe_serve.cli.main import main
from predictors.registry import make_predictor
from tests.predictors.synth import layer_map_trace, router_trace


def test_the_expert_cache_refuses_a_predictor_of_another_top_k(tiny_checkpoint, tmp_path):
    from moe_serve import LLM

    path = tiny_checkpoint("mixtral")  # 3 MoE layers, 8 experts, top-2
    pred = tmp_path / "k3.safetensors"
    make_predictor("transition", 3, 8, 3, 1).fit([layer_map_trace(tokens=60, L=3, E=8, K=3, seqs=3)]).save(pred)
    with pytest.raises(ValueError, match=f"expert_cache.predictor: {pred} was fitted for top_k=3, the model routes top_k=2"):
        LLM(model=str(path), dtype="float32", kv_cache_gb=0.01, expert_cache_slots=4, cpu_experts="off",
            predictor=str(pred), cache_policy="predicted-prefetch")


def test_cache_sim_refuses_a_predictor_of_another_top_k_or_needing_hidden_states(tmp_path, capsys):
    trace = tmp_path / "t.npz"
    layer_map_trace(tokens=60, L=3, E=8, K=2, seqs=3).save(trace)
    k3 = tmp_path / "k3.safetensors"
    make_predictor("transition", 3, 8, 3, 1).fit([layer_map_trace(tokens=60, L=3, E=8, K=3, seqs=3)]).save(k3)
    rc = main(["cache-sim", "--trace", str(trace), "--predictor", str(k3), "--policy", "predicted"])
    err = capsys.readouterr().err
    assert rc == 2 and f"--predictor {k3} was fitted for top_k=3, --trace {trace} has top_k=2" in err, err
    router = tmp_path / "router.safetensors"
    make_predictor("router", 3, 8, 2, 1, steps=2).fit([router_trace(tokens=60, L=3, E=8, K=2, H=8, seqs=3)[0]]).save(router)
    rc = main(["cache-sim", "--trace", str(trace), "--predictor", str(router), "--policy", "predicted"])
    err = capsys.readouterr().err  # was: 'router: needs state.hidden (...)', naming neither flag nor file
    assert rc == 2 and f"--predictor {router} (router) predicts from hidden states; --trace {trace} has none" in err, err
