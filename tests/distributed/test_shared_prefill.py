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


@pytest.mark.parametrize("family,dispatch", [("deepseek_v2", "allgather"), ("qwen3_moe", "alltoall")])
def test_a_kv_copy_across_ranks_continues_as_the_source_would(tmp_path, family, dispatch):
    """DistributedModel.copy_kv_prefix, model level, on families with other cache layouts (MLA's latent cache):
    slot 0's prompt copied to slot 1 (the other rank under data-parallel attention) and slot 2 (the same rank),
    then each decodes a token: logits equal the single-process model's, which copies in one process."""
    import torch

    from moe_serve.config import ModelConfig, ParallelConfig
    from moe_serve.distributed.executor import DistributedModel
    from moe_serve.models import ForwardBatch, load_model
    from tests.models.tiny_checkpoints import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(family, tmp_path / family)
    prompt, dirt = [3, 4, 5, 6, 7, 8], [50, 51, 52, 53, 54, 55, 56]

    def run(model):
        model.allocate_kv_cache(3, 32)
        for s in (1, 2):  # another prompt's KV in the destinations first
            model.forward(ForwardBatch.single(dirt, slot=s))
        model.forward(ForwardBatch.single(prompt, slot=0))
        model.copy_kv_prefix(0, [1, 2], len(prompt) - 1)  # all but the last token, which each then feeds
        n = len(prompt) - 1
        return model.forward(ForwardBatch(token_ids=torch.tensor([prompt[-1]] * 3), positions=torch.tensor([n] * 3),
                                          slot_ids=[0, 1, 2], query_lens=[1] * 3, context_lens=[n] * 3))

    want = run(load_model(ckpt))
    dm = DistributedModel(ModelConfig(model=str(ckpt)),
                          ParallelConfig(tp=1, ep=2, dispatch=dispatch, allreduce="gloo", threads_per_rank=1))
    try:
        got = run(dm)
    finally:
        dm.close()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1:], got[:1].expand(2, -1), atol=1e-5, rtol=1e-5)
