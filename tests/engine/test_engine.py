"""The engine core on a real tiny checkpoint: continuous batching, chunked prefill, stops, abort, queue."""
import re

import pytest

from moe_serve.config import EngineConfig
from moe_serve.engine import LLMEngine, QueueFullError, SamplingParams
from tests.engine.helpers import run

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = ["The quick brown fox", "Once upon a time there was", "def add(a, b):", "Mixture-of-experts models route"]


def engine(model_dir, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig.from_flat(model=str(model_dir), **kw))


def alone(model_dir, prompt, params=GREEDY, **kw):
    eng = engine(model_dir, **kw)
    eng.add_request(prompt, params, "x")
    return run(eng)["x"]


@pytest.fixture(scope="module")
def references(tiny_dir):
    return {p: alone(tiny_dir, p).token_ids for p in PROMPTS}


def test_requests_joining_mid_decode_match_alone(tiny_dir, references):
    eng = engine(tiny_dir, max_num_seqs=4)
    done = {}
    for i, p in enumerate(PROMPTS):
        eng.add_request(p, GREEDY, str(i))
        for _ in range(3):  # the next request arrives while the earlier ones decode
            for out in eng.step():
                if out.finished:
                    done[out.request_id] = out
    done.update(run(eng))
    for i, p in enumerate(PROMPTS):
        assert done[str(i)].token_ids == references[p], p
        assert done[str(i)].finish_reason == "length"
        assert len(done[str(i)].token_ids) == 12


def test_chunked_prefill_matches_whole_prefill(tiny_dir):
    prompt = " ".join(PROMPTS * 3)
    whole = alone(tiny_dir, prompt)
    eng = engine(tiny_dir, prefill_chunk=5, max_num_batched_tokens=7, max_num_seqs=2)
    eng.add_request(prompt, GREEDY, "long")
    eng.add_request(PROMPTS[0], GREEDY, "short")
    plan_sizes = []
    done = {}
    while eng.has_unfinished():
        plan_sizes.append(sum(s.num_computed for s in eng.scheduler.running))
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    assert len(eng.tokenizer.encode(prompt)) > 7  # really spread over several steps
    assert done["long"].token_ids == whole.token_ids
    assert done["short"].token_ids == alone(tiny_dir, PROMPTS[0]).token_ids


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_dir):
    p = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=10, ignore_eos=True)
    a = alone(tiny_dir, PROMPTS[1], p)
    eng = engine(tiny_dir)
    eng.add_request(PROMPTS[0], SamplingParams(temperature=1.0, max_tokens=15), "other")
    eng.add_request(PROMPTS[1], p, "seeded")
    b = run(eng)["seeded"]
    assert a.token_ids == b.token_ids
    c = alone(tiny_dir, PROMPTS[1], SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=99, max_tokens=10,
                                                   ignore_eos=True))
    assert c.token_ids != a.token_ids


def test_stop_token_ids_and_stop_strings(tiny_dir, references):
    ref = references[PROMPTS[0]]
    stop_tok = ref[4]
    out = alone(tiny_dir, PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_tok]))
    assert out.finish_reason == "stop"
    assert out.token_ids == ref[: ref.index(stop_tok) + 1]  # the stop token is kept in the ids

    eng = engine(tiny_dir)
    full_text = eng.tokenizer.decode(ref)
    stop = full_text[len(full_text) // 2: len(full_text) // 2 + 3]
    assert stop.strip()
    out = alone(tiny_dir, PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, stop=[stop], ignore_eos=True))
    assert out.finish_reason == "stop"
    assert out.text == full_text[: full_text.index(stop)]


def test_context_limit_finishes_with_length(tiny_dir):
    eng = engine(tiny_dir, max_model_len=16)
    ids = eng.tokenizer.encode(PROMPTS[1])
    eng.add_request(ids, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True), "r")
    out = run(eng)["r"]
    assert out.finish_reason == "length"
    assert len(ids) + len(out.token_ids) == 16


def test_abort_frees_the_slot(tiny_dir):
    eng = engine(tiny_dir, max_num_seqs=1)
    eng.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True), "long")
    eng.add_request(PROMPTS[1], GREEDY, "next")
    for _ in range(3):
        eng.step()
    assert eng.num_running == 1 and eng.num_waiting == 1
    eng.abort("long")
    outs = {o.request_id: o for o in eng.step()}
    assert outs["long"].finished and outs["long"].finish_reason == "abort"
    assert eng.scheduler.running[0].request_id == "next"
    done = run(eng)
    assert done["next"].finish_reason == "length"
    assert eng.scheduler.free_slots == [0]


def test_abort_of_a_finished_request_spares_a_new_one_with_its_id(tiny_dir, references):
    """Aborting a finished id is ignored, also when the id is reused before the next step: the abort
    names the request that was live when it was asked for, not whichever holds the id later."""
    eng = engine(tiny_dir)
    eng.add_request(PROMPTS[0], GREEDY, "a")
    assert run(eng)["a"].finish_reason == "length"
    eng.abort("a")  # too late: "a" has finished
    eng.abort("never-seen")
    eng.add_request(PROMPTS[0], GREEDY, "a")  # the id is free again
    eng.add_request(PROMPTS[1], GREEDY, "never-seen")
    done = run(eng)
    assert done["a"].finish_reason == "length" and done["a"].token_ids == references[PROMPTS[0]]
    assert done["never-seen"].finish_reason == "length"


def test_queue_full_is_refused_clearly(tiny_dir):
    eng = engine(tiny_dir, max_num_seqs=1, max_queue=2)
    for i in range(3):
        eng.add_request(PROMPTS[0], GREEDY, f"r{i}")
        if i == 0:
            eng.step()  # r0 takes the only slot
    with pytest.raises(QueueFullError, match=r"scheduler.max_queue=2"):
        eng.add_request(PROMPTS[0], GREEDY, "r3")
    assert set(run(eng)) == {"r0", "r1", "r2"}


def test_bad_input_names_field_and_limit(tiny_dir):
    eng = engine(tiny_dir, max_model_len=32)
    with pytest.raises(ValueError, match=r"model.max_model_len=32"):
        eng.add_request(list(range(40)), GREEDY)
    with pytest.raises(ValueError, match="empty prompt"):
        eng.add_request([], GREEDY)
    with pytest.raises(ValueError, match=r"vocab_size=384"):
        eng.add_request([1, 2, 999], GREEDY)
    with pytest.raises(ValueError, match=r"stop_token_ids must be < vocab size 384"):
        eng.add_request([1, 2], SamplingParams(stop_token_ids=[500]))
    with pytest.raises(ValueError, match="request_id 'a' is already in use"):
        eng.add_request([1], GREEDY, "a")
        eng.add_request([2], GREEDY, "a")
    with pytest.raises(ValueError, match=r"max_model_len=100000 exceeds the model's context"):
        engine(tiny_dir, max_model_len=100000)
    with pytest.raises(ValueError, match=r"kv_cache.kv_cache_gb"):
        engine(tiny_dir, kv_cache_gb=1e-6, max_model_len=256)
    # a step that cannot hold one decode token per sequence would leave the high slots waiting
    with pytest.raises(ValueError, match=re.escape("scheduler.max_num_batched_tokens must be >= "
                                                   "kv_cache.max_num_seqs (8), got 4")):
        engine(tiny_dir, max_num_seqs=8, max_num_batched_tokens=4, prefill_chunk=2)


def test_a_failing_request_fails_alone(tiny_dir, references):
    eng = engine(tiny_dir)
    eng.add_request(PROMPTS[0], GREEDY, "good")
    bad = eng.make_sequence(PROMPTS[1], GREEDY, "bad")
    bad.prompt_ids[0] = 10_000  # slipped past validation: the embedding lookup fails in the forward
    eng.submit(bad)
    eng.add_request(PROMPTS[2], GREEDY, "good2")
    done = run(eng)
    assert done["bad"].finish_reason == "error" and "index" in done["bad"].error.lower()
    assert done["good"].token_ids == references[PROMPTS[0]]
    assert done["good2"].token_ids == references[PROMPTS[2]]


def test_a_request_whose_sampling_fails_fails_alone(tiny_dir):
    """A sampled batch where one request's parameters slipped past validation: that request ends
    with an error, the seeded requests beside it give what they give alone, the engine goes on."""
    seeded = [SamplingParams(temperature=0.9, top_p=0.9, max_tokens=8, seed=s, ignore_eos=True) for s in (1, 2)]
    want = [alone(tiny_dir, PROMPTS[i], p).token_ids for i, p in enumerate(seeded)]
    eng = engine(tiny_dir)
    eng.add_request(PROMPTS[0], seeded[0], "a")
    bad = eng.make_sequence(PROMPTS[2], SamplingParams(temperature=0.9, max_tokens=8, seed=3), "bad")
    bad.params.temperature = "hot"  # slipped past validation: the sampler fails on it
    eng.submit(bad)
    eng.add_request(PROMPTS[1], seeded[1], "b")
    done = run(eng)
    assert done["bad"].finish_reason == "error" and done["bad"].error.startswith("TypeError")
    assert [done["a"].token_ids, done["b"].token_ids] == want
    eng.add_request(PROMPTS[0], seeded[0], "again")  # still serving
    assert run(eng)["again"].token_ids == want[0]


def test_expert_load_counts_every_routed_token(tiny_dir):
    eng = engine(tiny_dir)
    ids = eng.tokenizer.encode(PROMPTS[0])
    eng.add_request(ids, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), "r")
    run(eng)
    load = eng.expert_load()
    fed = len(ids) + 5 - 1  # the last sampled token never enters the model
    assert load.shape == (2, 4)
    assert (load.sum(axis=1) == fed * 2).all()  # top-2
    assert engine(tiny_dir, expert_load_stats=False).expert_load() is None


def test_a_start_that_fails_after_the_model_loads_leaves_no_thread(tiny_dir):
    """The expert store's copy thread starts with the model; a failure after it (here the KV budget)
    must close the model, not leave the thread behind (as a failed tensor-parallel start would its ranks)."""
    import threading

    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(ValueError, match=r"kv_cache.kv_cache_gb"):
        engine(tiny_dir, kv_cache_gb=1e-6, max_model_len=256, expert_cache_slots=4, cpu_experts="off")
    left = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert left == []


def test_aborts_while_waiting_mid_prefill_and_mid_decode_free_every_slot(tiny_dir, references):
    """One request aborted at each stage (still queued, between two prefill chunks, decoding): every slot
    comes back, and the requests beside them give what they give alone."""
    eng = engine(tiny_dir, max_num_seqs=2, prefill_chunk=4, max_num_batched_tokens=6)
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    eng.add_request(PROMPTS[0], GREEDY, "a")
    eng.add_request(" ".join(PROMPTS), long, "prefilling")  # many chunks of 4
    eng.add_request(PROMPTS[1], long, "queued")  # no slot for it yet
    eng.step()
    eng.step()
    prefilling = next(s for s in eng.scheduler.running if s.request_id == "prefilling")
    assert 0 < prefilling.num_computed < len(prefilling.prompt_ids)
    assert [s.request_id for s in eng.scheduler.waiting] == ["queued"]
    eng.abort("queued")
    eng.abort("prefilling")
    eng.add_request(PROMPTS[2], long, "decoding")
    done = {}
    while "decoding" not in done:
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        seq = next((s for s in eng.scheduler.running if s.request_id == "decoding"), None)
        if seq is not None and len(seq.output_ids) == 3:
            eng.abort("decoding")
    eng.add_request(PROMPTS[3], GREEDY, "d")
    done.update(run(eng))
    assert {r: done[r].finish_reason for r in ("queued", "prefilling", "decoding")} == dict.fromkeys(
        ("queued", "prefilling", "decoding"), "abort")
    assert len(done["decoding"].token_ids) == 3 and done["queued"].token_ids == []
    assert done["a"].token_ids == references[PROMPTS[0]] and done["d"].token_ids == references[PROMPTS[3]]
    assert sorted(eng.scheduler.free_slots) == [0, 1] and not eng.live_sequences()
