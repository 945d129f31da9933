"""A plan written by `moe-serve place` from a trace the engine recorded is loaded and served by the
distributed runtime (EP=2, replicas), with the single-process model's greedy tokens."""
import json

import pytest
import torch

from moe_serve import LLM, SamplingParams
from moe_serve.cli.main import main


@pytest.mark.parametrize("algorithm, suffix", [("affinity", ".json"), ("eplb", ".safetensors")])
def test_a_placed_plan_serves_the_same_tokens(tmp_path, capsys, algorithm, suffix):
    from moe_serve.config import ModelConfig, ParallelConfig
    from moe_serve.distributed.executor import DistributedModel
    from moe_serve.models import load_model
    from tests.distributed.helpers import greedy
    from tests.models.tiny_checkpoints import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint("mixtral", tmp_path / "mixtral")  # 8 experts, top-2, 3 MoE layers
    trace, plan = tmp_path / "t.npz", tmp_path / f"plan{suffix}"
    # a tokenizer-free checkpoint: the trace is recorded through the Python API, from token ids
    with LLM(model=str(ckpt), record_trace=str(trace)) as llm:
        llm.generate([[3, 4, 5, 6, 7, 8, 9], [20, 21, 22]],
                     SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert main(["place", "--trace", str(trace), "--ep", "2", "--redundant", "2", "--algorithm", algorithm,
                 "--out", str(plan)]) == 0
    capsys.readouterr()
    from moe_serve.distributed.runner import default_plan

    placed = default_plan(3, 8, 2, 2, str(plan))  # as the ranks load it
    assert placed.num_slots == 10 and (placed.replica_count > 1).any()
    assert (placed.phy2log != default_plan(3, 8, 2, 2).phy2log).any()  # not the default layout
    ref = load_model(ckpt)
    ref.allocate_kv_cache(4, 64)
    want, want_logits = greedy(ref, steps=6)
    dm = DistributedModel(ModelConfig(model=str(ckpt)),
                          ParallelConfig(tp=1, ep=2, placement=str(plan), allreduce="gloo", threads_per_rank=1))
    try:
        dm.allocate_kv_cache(4, 64)
        got, got_logits = greedy(dm, steps=6)
    finally:
        dm.close()
    assert got == want
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
