"""GET /v1/traces' counts (TraceControl.status -> LiveTraceHook.counts) are kept as chunks are recorded.

counts() walked every recorded chunk under the hook's lock, which every engine step also takes, on the
server's event loop: its cost grew with the recording (~30 ms per million tokens). It now reads totals
kept by the recorder; they must equal the walk exactly."""
import time
from types import SimpleNamespace

import torch

from moe_serve import LLM, SamplingParams
from moe_serve.models.batch import ForwardBatch
from moe_serve.models.hooks import NO_HOOKS
from moe_serve.server.bridge import EngineBridge
from moe_serve.server.traces import LiveTraceHook, TraceControl

PROMPTS = ["The quick brown fox jumps", "Once upon a time", "def add(a, b):\n    return"]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def walk(hook: LiveTraceHook) -> tuple[int, int]:
    """What counts() returned before: every chunk's rows, summed."""
    chunks = hook.recorder.chunks
    return len(chunks), sum(len(c[0]) for seq in chunks.values() for c in seq)


def test_counts_equal_the_walk_for_a_real_model_through_the_engine(tiny_dir, tmp_path):
    opts = dict(max_num_seqs=2, prefill_chunk=3, max_num_batched_tokens=4)  # prefill chunks and decodes mixed
    with LLM(model=str(tiny_dir), **opts) as llm:
        control = TraceControl(EngineBridge(llm.engine), str(tmp_path))
        assert control.unavailable is None
        assert control.status() == {"recording": False, "sequences": 0, "tokens": 0}
        control.start()
        outs = llm.generate(PROMPTS, GREEDY)
        status = control.status()
        fed = sum(len(o.prompt_token_ids) + len(o.token_ids) - 1 for o in outs)  # the last sampled token is not fed
        assert (status["sequences"], status["tokens"]) == walk(control.hook) == (3, fed)
        trace = control.hook.snapshot()
        assert (trace.num_sequences, trace.num_tokens) == (3, fed)

        control.start()  # a new recording starts from nothing
        assert control.status() == {"recording": True, "sequences": 0, "tokens": 0}
        out = llm.generate(PROMPTS[:1], GREEDY)[0]
        assert control.hook.counts() == walk(control.hook) == (1, len(out.prompt_token_ids) + len(out.token_ids) - 1)
        assert control.stop() == {"recording": False, "sequences": 1, "tokens": walk(control.hook)[1]}


def _step(hook: LiveTraceHook, seqs: int, tokens: int, first: bool) -> None:
    """One synthetic step: `seqs` sequences of `tokens` rows each, through the hook's record path."""
    n = seqs * tokens
    batch = ForwardBatch(token_ids=torch.arange(n) % 100, positions=torch.zeros(n, dtype=torch.long),
                         slot_ids=list(range(seqs)), query_lens=[tokens] * seqs,
                         context_lens=[0 if first else 1] * seqs, seq_ids=list(range(seqs)))
    ids = torch.randint(0, 4, (n, 2))
    hook.begin_step(batch)
    for layer in range(2):
        hook.route(layer, None, ids, torch.rand(n, 2))
    hook.end_step(batch)


def _time_counts(hook: LiveTraceHook, repeats: int = 200) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        hook.counts()
        best = min(best, time.perf_counter() - t)
    return best


def test_counts_time_does_not_grow_with_the_recording(tmp_path):
    spec = SimpleNamespace(num_moe_layers=2, num_experts=4, top_k=2, family="tiny")
    control = TraceControl(SimpleNamespace(spec=spec, model=SimpleNamespace(hooks=NO_HOOKS)), str(tmp_path))
    hook = control.hook
    control.start()
    seqs, steps = 2000, 10  # N = 20,000 chunks, then 10 N
    _step(hook, seqs, 3, first=True)
    for _ in range(steps - 1):
        _step(hook, seqs, 1, first=False)
    assert hook.counts() == walk(hook) == (seqs, seqs * (3 + steps - 1))
    small = _time_counts(hook)
    for _ in range(9 * steps):
        _step(hook, seqs, 1, first=False)
    assert sum(len(c) for c in hook.recorder.chunks.values()) == 10 * seqs * steps
    assert hook.counts() == walk(hook) == (seqs, seqs * (3 + 10 * steps - 1))
    large = _time_counts(hook)
    assert large / small < 3, f"counts() took {small * 1e6:.1f} us for N chunks, {large * 1e6:.1f} us for 10 N"

    control.start()  # a new recording: the counts start again
    assert hook.counts() == (0, 0)
    _step(hook, 5, 2, first=True)
    assert hook.counts() == walk(hook) == (5, 10)


def test_a_live_recording_holds_every_completion_of_an_n_request_whole(tiny_dir, tmp_path):
    # the n completions share one prefill; the live trace copies the prompt's rows to each at the fork, so
    # it holds n whole sequences from position 0 (as when each prefilled alone), not the prefilling one only
    with LLM(model=str(tiny_dir), max_num_seqs=4) as llm:
        control = TraceControl(EngineBridge(llm.engine), str(tmp_path))
        control.start()
        out = llm.generate(PROMPTS[:1], SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=5, ignore_eos=True))[0]
        trace = control.hook.snapshot()
        assert trace.num_sequences == 3 and control.hook.counts() == walk(control.hook)
        got = sorted(trace.token_ids[trace.sequence(i)].tolist() for i in range(3))
        assert got == sorted(out.prompt_token_ids + c.token_ids[:4] for c in out.outputs)
