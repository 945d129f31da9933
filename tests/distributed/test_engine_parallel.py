"""The engine with worker ranks: `LLM(..., tp=2, ep=2)` gives the single-process greedy outputs, and a
rank killed mid-generation fails the requests in flight with an error naming it (no hang)."""
import os
import signal
import time

from moe_serve.config import EngineConfig
from moe_serve.engine import LLM, SamplingParams
from moe_serve.engine.llm_engine import LLMEngine
from tests.models.tiny_checkpoints import make_tiny_checkpoint

PROMPTS = [[5, 6, 7, 8], [11, 12], [40, 41, 42, 43, 44]]


def test_llm_tp2_ep2_greedy_matches_then_survives_a_dead_rank(tmp_path):
    ckpt = str(make_tiny_checkpoint("mixtral", tmp_path / "mixtral"))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with LLM(model=ckpt, max_num_seqs=4) as llm:
        want = [o.token_ids for o in llm.generate(PROMPTS, params)]
        want_load = llm.expert_load()
    engine = LLMEngine(EngineConfig.from_flat(model=ckpt, max_num_seqs=4, tp=2, ep=2, allreduce="gloo",
                                              threads_per_rank=1, heartbeat_timeout_s=20))
    try:
        for i, p in enumerate(PROMPTS):
            engine.add_request(p, params, request_id=f"r{i}")
        done = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.token_ids
        assert [done[f"r{i}"] for i in range(len(PROMPTS))] == want
        assert (engine.expert_load() == want_load).all()  # the ranks' counters, summed, as one process counts
        # now kill rank 1 in the middle of the next generation
        for i, p in enumerate(PROMPTS):
            engine.add_request(p, params, request_id=f"k{i}")
        for _ in range(3):
            engine.step()
        os.kill(engine.model.group.pids()[1], signal.SIGKILL)
        t0, errors = time.monotonic(), {}
        while engine.has_unfinished() and time.monotonic() - t0 < 30:
            for out in engine.step():
                if out.finished:
                    errors[out.request_id] = (out.finish_reason, out.error)
        assert time.monotonic() - t0 < 30, "the engine hung after a rank died"
        assert set(errors) == {"k0", "k1", "k2"}
        for reason, error in errors.values():
            assert reason == "error" and "rank 1" in error and "exited with code -9" in error, error
        # the engine stays up and refuses new work with the same clear error
        engine.add_request(PROMPTS[0], params, request_id="after")
        out = [o for _ in range(3) for o in engine.step() if o.finished]
        assert out and out[0].finish_reason == "error" and "rank 1" in out[0].error
    finally:
        engine.close()
