"""On worker ranks too, a request's n completions share one prefill of the prompt: the ranks copy its KV
into the siblings' slots (across ranks under data-parallel attention, where slot s lives on rank s % 2), and
each completion gives exactly what it gives as its own n = 1 request alone; every slot comes back."""
import pytest

from moe_serve.config import EngineConfig
from moe_serve.engine import LLMEngine, SamplingParams
from moe_serve.engine.sampling_params import completion_seed
from tests.engine.helpers import run
from tests.engine.test_shared_prefill import OTHER, PROMPT, dirty_every_slot, run_all

KW = dict(max_num_seqs=4, prefill_chunk=16, max_num_batched_tokens=24)  # the prompt takes several steps


def params(seed, n=1, max_tokens=8):
    if seed is None:
        return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, n=n)
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, ignore_eos=True, n=n)


def alone(model_dir, p):
    """A completion as its own n = 1 request, alone in a fresh single-process engine (fp32: the ranks give the
    same tokens, as tests/distributed/test_engine_parallel.py checks for greedy)."""
    eng = LLMEngine(EngineConfig.from_flat(model=str(model_dir), **KW))
    eng.add_request(PROMPT, p, "x")
    return run(eng)["x"].outputs[0].token_ids


@pytest.mark.limit(240)
@pytest.mark.parametrize("tp,ep", [(1, 2), (2, 2)])  # DP attention (copies cross ranks) / TP (each rank copies)
def test_completions_share_the_prefill_on_the_ranks(tiny_dir, tp, ep):
    want = {seed: [alone(tiny_dir, params(None if seed is None else completion_seed(seed, i))) for i in range(4)]
            for seed in (None, 7)}
    eng = LLMEngine(EngineConfig.from_flat(model=str(tiny_dir), tp=tp, ep=ep, allreduce="gloo", threads_per_rank=1,
                                           heartbeat_timeout_s=30, **KW))
    try:
        start = sorted(eng.scheduler.free_slots)
        dirty_every_slot(eng)  # another prompt's KV in every slot, on both ranks: a skipped copy would read it
        ids = eng.tokenizer.encode(PROMPT)
        assert len(ids) > 3 * 16
        for seed in (None, 7):
            before = eng.expert_load().sum()
            eng.add_request(PROMPT, params(seed, 4), f"r{seed}")
            got = run_all(eng)[f"r{seed}"]
            assert [c.token_ids for c in got] == want[seed], seed
            fed = len(ids) + 4 * (8 - 1)  # the prompt once, then every completion's fed-back tokens
            assert eng.expert_load().sum() - before == fed * 2 * 2, seed  # 2 MoE layers, top-2
            assert sorted(eng.scheduler.free_slots) == start
        assert len(set(map(tuple, want[7]))) == 4  # distinct draws: each completion its own generator
        # 3 free slots for 4 completions: the fourth, admitted once its siblings decode, copies their prompt KV
        # (all but the last token, which it feeds) in the step it joins
        before = eng.expert_load().sum()
        eng.add_request(OTHER, params(None, max_tokens=100), "busy")
        eng.step()
        eng.add_request(PROMPT, params(7, 4), "late")
        group = [s for s in eng.live_sequences() if s.request_id == "late"]
        while not group[1].output_ids:
            eng.step()
        assert group[3].slot is None
        eng.abort("busy")
        busy = next(o for o in eng.step() if o.request_id == "busy").outputs[0]
        assert group[3].num_computed == len(ids) and len(group[3].output_ids) == 1
        assert [c.token_ids for c in run_all(eng)["late"]] == want[7]
        fed = len(ids) + 1 + 4 * (8 - 1) + len(eng.tokenizer.encode(OTHER)) + len(busy.token_ids) - 1
        assert eng.expert_load().sum() - before == fed * 2 * 2
        assert sorted(eng.scheduler.free_slots) == start
        # aborted while siblings wait on the prefill, and once they are forked: every slot comes back
        for stage in ("mid-prefill", "forked"):
            eng.add_request(PROMPT, params(3, 4, max_tokens=40), stage)
            eng.step()
            assert {s.fork_of is not None for s in eng.live_sequences()} == {True, False}
            while stage == "forked" and not any(s.output_ids for s in eng.live_sequences()):
                eng.step()
            eng.abort(stage)
            assert [c.finish_reason for c in run_all(eng)[stage]] == ["abort"] * 4
            assert sorted(eng.scheduler.free_slots) == start and not eng.live_sequences()
        eng.add_request(OTHER, params(None), "after")  # serving goes on, on the ranks' reused slots
        assert run(eng)["after"].outputs[0].token_ids == alone_other(tiny_dir)
    finally:
        eng.close()


def alone_other(model_dir):
    eng = LLMEngine(EngineConfig.from_flat(model=str(model_dir), **KW))
    eng.add_request(OTHER, params(None), "x")
    return run(eng)["x"].outputs[0].token_ids
