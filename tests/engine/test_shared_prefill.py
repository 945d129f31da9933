"""A request's n completions share one prefill of the prompt: each completion gives exactly what it gives
as its own n = 1 request (seeded with completion_seed(seed, i)) prefilled alone, its slot holds the same
prompt KV, the model runs the prompt once (expert-load counter, routing trace), and every slot comes back
however the request ends."""
import pytest
import torch

from moe_serve.config import EngineConfig
from moe_serve.engine import LLMEngine, SamplingParams
from moe_serve.engine.sampling_params import completion_seed
from tests.engine.helpers import run

PROMPT = " ".join(["Once upon a time there was a mixture of experts that routed every token."] * 3)
OTHER = "def add(a, b): return a + b"
EXTRAS = dict(logprobs=2, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2)


def engine(model_dir, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig.from_flat(model=str(model_dir), **kw))


def params(seed, n=1, **kw):
    base = dict(max_tokens=10, ignore_eos=True, n=n) | kw
    kw = {}
    if seed is None:
        return SamplingParams(temperature=0, **base, **kw)
    return SamplingParams(temperature=1.0, seed=seed, **base, **kw)


def alone(model_dir, prompt, p, **kw):
    """Completion i of an n-request as it was before: its own n = 1 request, alone in a fresh engine."""
    eng = engine(model_dir, **kw)
    eng.add_request(prompt, p, "x")
    c = run(eng)["x"].outputs[0]
    return c.token_ids, c.logprobs


def run_all(eng):
    """Step until idle; {request_id: [each completion's last CompletionOutput, by index]} (a streamed
    output carries the completion that changed)."""
    last = {}
    while eng.has_unfinished():
        for out in eng.step():
            for c in out.outputs:
                last.setdefault(out.request_id, {})[c.index] = c
    return {rid: [cs[i] for i in sorted(cs)] for rid, cs in last.items()}


def completions(outs):
    return [(c.token_ids, c.logprobs) for c in outs]


def assert_same(got, want):
    """Same tokens and top-logprob ids, exactly; logprobs equal up to fp32 rounding, which depends on the
    batch's shape (a request run alone and in a batch differ by ~1e-6, as they did before sharing)."""
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, g), (_, w) in zip(got, want):
        assert (g is None) == (w is None)
        for a, b in zip(g or [], w or []):
            assert (a.token_id, a.rank, [t for t, _ in a.top]) == (b.token_id, b.rank, [t for t, _ in b.top])
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [lp for _, lp in a.top] == pytest.approx([lp for _, lp in b.top], abs=1e-4)


def dirty_every_slot(eng):
    """Leave another prompt's KV in every slot: a completion that skipped the copy would read it."""
    for i in range(eng.num_slots):
        eng.add_request(OTHER + " x" * i, SamplingParams(temperature=0, max_tokens=3), f"d{i}")
    run(eng)


@pytest.mark.parametrize("seed", [None, 7])
@pytest.mark.parametrize("extras", [{}, EXTRAS])
def test_each_completion_is_its_own_request_alone_with_chunked_prefill(tiny_dir, seed, extras):
    kw = dict(max_num_seqs=4, prefill_chunk=16, max_num_batched_tokens=24)  # the prompt takes several steps
    want = [alone(tiny_dir, PROMPT, params(None if seed is None else completion_seed(seed, i), **extras), **kw)
            for i in range(4)]
    eng = engine(tiny_dir, **kw)
    assert len(eng.tokenizer.encode(PROMPT)) > 3 * 16
    dirty_every_slot(eng)
    for n in (1, 2, 3, 4):
        eng.add_request(PROMPT, params(seed, n, **extras), f"n{n}")
        got = completions(run_all(eng)[f"n{n}"])
        assert len(got) == n
        assert_same(got, want[:n])
        if seed is None:  # greedy completions read one prefill: the same tokens, and logprobs within the
            # rounding that a row's place in the batch may change (bitwise on some CPUs, ~1e-6 on AMD EPYC)
            assert_same(got, [got[0]] * n)
    if seed is not None:
        assert len({tuple(t) for t, _ in want}) == 4  # distinct draws: a shared generator would show


def test_completions_joining_mid_decode_and_waiting_for_a_slot(tiny_dir):
    """n=4 joins a request mid-decode with 3 free slots: three share the prefill, the fourth waits for a
    slot and prefills alone; each still gives what it gives alone, and so does the request it joined."""
    kw = dict(max_num_seqs=4, prefill_chunk=16, max_num_batched_tokens=24)
    long = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    want_other = alone(tiny_dir, OTHER, long, **kw)[0]
    want = [alone(tiny_dir, PROMPT, params(completion_seed(3, i), **EXTRAS), **kw) for i in range(4)]
    eng = engine(tiny_dir, **kw)
    dirty_every_slot(eng)
    eng.add_request(OTHER, long, "other")
    for _ in range(4):
        eng.step()
    eng.add_request(PROMPT, params(3, 4, **EXTRAS), "n4")
    eng.step()
    followers = [s for s in eng.scheduler.running if s.fork_of is not None]
    assert len(followers) == 2 and len(eng.scheduler.waiting) == 1  # 1 prefills, 2 wait on it, 1 has no slot
    done = run_all(eng)
    assert done["other"][0].token_ids == want_other
    assert_same(completions(done["n4"]), want)


def test_sibling_slots_hold_the_prompt_kv_of_the_prefill(tiny_dir):
    eng = engine(tiny_dir, max_num_seqs=3, prefill_chunk=16, max_num_batched_tokens=24)
    dirty_every_slot(eng)
    eng.add_request(PROMPT, params(1, 3, max_tokens=50), "r")
    group = eng.live_sequences()
    n = len(group[0].prompt_ids)
    while not group[0].output_ids:
        eng.step()
    assert [len(s.output_ids) for s in group] == [1, 1, 1] and {s.num_computed for s in group} == {n}
    slots = [s.slot for s in group]
    for layer in eng.model.kv_cache:
        for cache in layer:  # [slots, max_len, ...]
            for s in slots[1:]:
                assert torch.equal(cache[s, :n], cache[slots[0], :n])
            assert cache[slots[0], :n].abs().sum() > 0
    eng.abort("r")
    run(eng)


def test_the_model_runs_the_prompt_once(tiny_dir, tmp_path):
    """The expert-load counter and the routing trace see the prompt once; time to first token is the
    same step for every completion."""
    trace = tmp_path / "t.npz"
    eng = engine(tiny_dir, max_num_seqs=4, record_trace=str(trace))
    ids = eng.tokenizer.encode(PROMPT)
    eng.add_request(ids, params(5, 4, max_tokens=6), "r")
    outs = run_all(eng)["r"]
    fed = len(ids) + 4 * (6 - 1)  # the prompt once, then every completion's fed-back tokens
    assert (eng.expert_load().sum(axis=1) == fed * 2).all()  # top-2
    # a trace sequence per completion, each whole from position 0 (the prompt's rows are those of the
    # one prefill, copied at the fork), as when each prefilled alone; the rows left out before were lost
    recorded = eng.save_trace()
    assert recorded.num_sequences == 4
    rows = [recorded.sequence(i) for i in range(4)]
    assert sorted(recorded.token_ids[r].tolist() for r in rows) == sorted(ids + c.token_ids[:5] for c in outs)
    prompt_rows = [recorded.experts[r][: len(ids)] for r in rows]
    assert all((p == prompt_rows[0]).all() for p in prompt_rows)
    firsts = {c.metrics.first_token_time for c in outs}
    assert len(firsts) == 1 and None not in firsts and len(outs) == 4
    assert all(c.metrics.time_to_first_token == outs[0].metrics.time_to_first_token > 0 for c in outs)


@pytest.mark.parametrize("stage", ["waiting", "mid-prefill", "forked"])
def test_every_slot_comes_back_after_abort_and_finish(tiny_dir, stage):
    eng = engine(tiny_dir, max_num_seqs=3, prefill_chunk=8, max_num_batched_tokens=12)
    start = sorted(eng.scheduler.free_slots)
    eng.add_request(OTHER, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), "busy")
    eng.step()
    eng.add_request(PROMPT, params(2, 4, max_tokens=40), "r")  # 2 slots for 4 completions
    if stage != "waiting":
        eng.step()
        assert {s.fork_of is not None for s in eng.scheduler.running if s.request_id == "r"} == {True, False}
    if stage == "forked":
        while not any(s.output_ids for s in eng.live_sequences() if s.request_id == "r"):
            eng.step()
    eng.abort("r")
    done = run_all(eng)
    assert [c.finish_reason for c in done["r"]] == ["abort"] * 4
    assert done["busy"][0].finish_reason == "length"
    assert sorted(eng.scheduler.free_slots) == start and not eng.live_sequences()
    eng.add_request(PROMPT, params(2, 4, max_tokens=3), "again")  # finishes normally: all slots back too
    assert [c.finish_reason for c in run_all(eng)["again"]] == ["length"] * 4 and sorted(eng.scheduler.free_slots) == start


def test_a_prefill_that_fails_passes_the_prompt_to_a_waiting_sibling(tiny_dir):
    """The completion prefilling the prompt fails in the forward: a sibling waiting on it prefills
    instead (and here fails the same way, the prompt being bad); the request beside them is untouched
    and every slot comes back."""
    eng = engine(tiny_dir, max_num_seqs=4)
    want = alone(tiny_dir, OTHER, params(None), max_num_seqs=4)[0]
    eng.add_request(OTHER, params(None), "good")
    bad = eng.make_request(PROMPT, params(4, 3))
    bad[0].prompt_ids[0] = 10_000  # slipped past validation (the group shares the list): the embedding fails
    eng.submit(bad)
    eng.step()  # the prefilling one fails: the next in line is to prefill, the last now waits on that one
    assert bad[0].finish_reason == "error" and bad[1].fork_of is None and bad[2].fork_of is bad[1]
    assert bad[1].num_computed == 0 and bad[1].slot is not None and not bad[1].finished
    eng.step()
    assert bad[1].finish_reason == "error" and bad[2].fork_of is None and not bad[2].finished
    done = run_all(eng)
    assert [s.finish_reason for s in bad] == ["error"] * 3 and "index" in bad[2].error.lower()
    assert done["good"][0].token_ids == want
    assert sorted(eng.scheduler.free_slots) == [0, 1, 2, 3] and not eng.live_sequences()


def test_under_routing_replay_each_completion_prefills_its_own_trace_sequence(tiny_dir, tmp_path):
    """Replay matches every completion to its own trace sequence, so siblings' prompt KV differ: there
    the prompt is prefilled per completion, as n = 1 requests replayed in the same order are."""
    trace = tmp_path / "t.npz"
    rec = engine(tiny_dir, record_trace=str(trace))
    for i, p in enumerate([PROMPT, OTHER, "Mixture-of-experts models route"]):
        rec.add_request(p, params(None, max_tokens=4), f"r{i}")
    run(rec)
    rec.close()
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    each = engine(tiny_dir, replay_trace=str(trace))
    for i in range(3):
        each.add_request(PROMPT, greedy, f"c{i}")
    want = run_all(each)
    shared = engine(tiny_dir, replay_trace=str(trace))
    shared.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, n=3), "r")
    got = run_all(shared)["r"]
    assert [c.token_ids for c in got] == [want[f"c{i}"][0].token_ids for i in range(3)]
    assert len({tuple(c.token_ids) for c in got}) > 1  # the trace sequences route differently


@pytest.mark.parametrize("seed", [None, 6])
def test_a_completion_admitted_after_the_prefill_copies_the_prompt_kv(tiny_dir, tmp_path, seed):
    """n=3 with 2 free slots: the third completion gets a slot only once its siblings decode. It copies
    their prompt KV (all but the last token, which it feeds for its logits) instead of prefilling the
    prompt again; it gives what it gives alone, the counter and the trace see the prompt once more by
    one token only, and its trace sequence is whole from position 0."""
    kw = dict(max_num_seqs=3, prefill_chunk=16, max_num_batched_tokens=24)
    want = [alone(tiny_dir, PROMPT, params(None if seed is None else completion_seed(seed, i), **EXTRAS), **kw)
            for i in range(3)]
    eng = engine(tiny_dir, record_trace=str(tmp_path / "t.npz"), **kw)
    dirty_every_slot(eng)
    load_before = eng.expert_load()
    ids = eng.tokenizer.encode(PROMPT)
    eng.add_request(OTHER, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True), "busy")
    eng.step()
    eng.add_request(PROMPT, params(seed, 3, **EXTRAS), "r")
    group = [s for s in eng.live_sequences() if s.request_id == "r"]
    while not group[1].output_ids:
        eng.step()
    assert group[2].slot is None and not group[2].output_ids  # still waiting for a slot
    eng.abort("busy")
    # frees busy's slot; the third is admitted, its KV copied, its last prompt token fed
    busy = next(o for o in eng.step() if o.request_id == "busy").outputs[0]
    assert group[2].num_computed == len(ids) and len(group[2].output_ids) == 1
    outs = run_all(eng)["r"]
    assert_same(completions(outs), want)
    fed = len(ids) + 1 + sum(len(c.token_ids) - 1 for c in outs)  # the prompt once, + the third's last token
    fed += len(eng.tokenizer.encode(OTHER)) + len(busy.token_ids) - 1
    assert ((eng.expert_load() - load_before).sum(axis=1) == fed * 2).all()  # per layer, top-2
    recorded = eng.save_trace()
    rows = {tuple(recorded.token_ids[recorded.sequence(i)].tolist()): recorded.sequence(i)
            for i in range(recorded.num_sequences)}
    mine = [rows[tuple(ids + c.token_ids[:-1])] for c in outs]  # each completion whole from position 0
    for r in mine[1:]:
        assert (recorded.experts[r][:len(ids) - 1] == recorded.experts[mine[0]][:len(ids) - 1]).all()
    assert sorted(eng.scheduler.free_slots) == [0, 1, 2] and not eng.live_sequences()


def test_two_completions_admitted_together_after_the_prefill(tiny_dir):
    """Two slots free at once after the prefill: the first late completion copies the prompt KV from a
    decoding sibling, the second waits on it (fork_of) and gets its whole prompt KV; all four still give
    what each gives alone."""
    kw = dict(max_num_seqs=4, prefill_chunk=16, max_num_batched_tokens=24)
    want = [alone(tiny_dir, PROMPT, params(completion_seed(9, i), **EXTRAS), **kw) for i in range(4)]
    eng = engine(tiny_dir, **kw)
    dirty_every_slot(eng)
    for rid in ("b1", "b2"):
        eng.add_request(OTHER, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True), rid)
    eng.step()
    eng.add_request(PROMPT, params(9, 4, **EXTRAS), "r")
    group = [s for s in eng.live_sequences() if s.request_id == "r"]
    while not group[0].output_ids:
        eng.step()
    eng.abort("b1")
    eng.abort("b2")
    eng.step()
    assert group[2].fork_of is None and group[3].fork_of is None and len(group[3].output_ids) == 1
    assert assert_same(completions(run_all(eng)["r"]), want) is None
    assert sorted(eng.scheduler.free_slots) == [0, 1, 2, 3]
