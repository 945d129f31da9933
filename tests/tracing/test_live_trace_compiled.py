"""The server's live trace hook and the compiled decode step (models/compiled.py)."""
from types import SimpleNamespace

import torch

from moe_serve.models import load_model
from moe_serve.models.batch import ForwardBatch
from moe_serve.server.traces import TraceControl
from moe_serve.tracing.recorder import TraceRecorder


def _decodes(n: int) -> ForwardBatch:
    return ForwardBatch(token_ids=torch.arange(5, 5 + n), positions=torch.full((n,), 3), slot_ids=list(range(n)),
                        query_lens=[1] * n, context_lens=[3] * n, seq_ids=list(range(n)))


def _prompts(n: int) -> ForwardBatch:
    """n three-token prompts [1, 2, 3] in slots 0..n-1: the positions before `_decodes`."""
    return ForwardBatch(token_ids=torch.tensor([1, 2, 3] * n), positions=torch.arange(3).repeat(n),
                        slot_ids=list(range(n)), query_lens=[3] * n, context_lens=[0] * n, seq_ids=list(range(n)))


def test_idle_live_trace_hook_leaves_decodes_compiled(tiny_checkpoint, tmp_path):
    """The server installs its trace hook for its lifetime: idle, it pushed every decode step of
    `serve --compile-decode` onto the eager path (it was not an id-only hook)."""
    model = load_model(tiny_checkpoint("mixtral"))
    model.allocate_kv_cache(num_slots=2, max_len=16)
    assert model.enable_compiled_decode(max_batch=2) is None  # compiles at the first compiled step only
    batch = _decodes(2)
    assert model.compiled.accepts(batch)
    control = TraceControl(SimpleNamespace(spec=model.spec, model=model), str(tmp_path))
    assert model.compiled.accepts(batch)  # idle: nothing is read
    control.start(record_hidden=False)
    assert model.compiled.accepts(batch)  # ids and weights come back from the compiled step too
    model(_prompts(2))  # eager; the sequences begin while recording (one that began before is left out)
    model(batch)
    assert model.compiled.failed is None and model.compiled.steps == 1
    trace = control.hook.snapshot()
    assert trace.num_sequences == 2 and trace.token_ids.tolist() == [1, 2, 3, 5, 1, 2, 3, 6]
    eager = load_model(tiny_checkpoint("mixtral"))
    eager.allocate_kv_cache(num_slots=2, max_len=16)
    eager.hooks = TraceRecorder(model.spec.num_moe_layers, model.spec.num_experts, model.spec.top_k)
    eager(_prompts(2))
    eager(batch)
    assert (trace.experts == eager.hooks.to_trace().experts).all()  # the routing the eager step records
    control.start(record_hidden=True)
    assert not model.compiled.accepts(batch)  # hidden states exist in the eager step only
    control.stop()
    assert model.compiled.accepts(batch)


def test_a_step_without_hidden_states_is_not_recorded_half(tmp_path):
    """A start with record_hidden between the compiled path's accepts() and its begin_step: the step
    brings no hidden states, so the fresh recording starts at the next step (not an AttributeError in
    the engine thread, nor a step recorded without them)."""
    from moe_serve.server.traces import LiveTraceHook

    hook = LiveTraceHook(num_layers=2, num_experts=4, top_k=2, meta={})
    hook.start(record_hidden=True)
    batch = _decodes(1)
    ids, w = torch.tensor([[0, 1]]), torch.tensor([[0.6, 0.4]])
    hook.begin_step(batch)
    for layer in range(2):
        hook.route(layer, None, ids, w)
    hook.end_step(batch)
    assert hook.snapshot().num_tokens == 0
    batch = ForwardBatch.single([5], slot=1)  # a sequence that begins while recording (0 is left out)
    hook.begin_step(batch)
    for layer in range(2):
        hook.route(layer, torch.ones(1, 8), ids, w)
    hook.end_step(batch)
    trace = hook.snapshot()
    assert trace.num_tokens == 1 and trace.hidden.shape == (1, 2, 8)


def _control(trace_dir) -> TraceControl:
    from moe_serve.models.hooks import NO_HOOKS

    spec = SimpleNamespace(num_moe_layers=2, num_experts=4, top_k=2, family="tiny")
    control = TraceControl(SimpleNamespace(spec=spec, model=SimpleNamespace(hooks=NO_HOOKS)), str(trace_dir))
    control.start()
    return control


def test_dump_that_cannot_be_written_says_where_and_why(tmp_path):
    """Were 500 'internal error: IsADirectoryError / FileExistsError ...' from open() or mkdir()."""
    import pytest

    from moe_serve.server.errors import APIError

    (tmp_path / "taken.npz").mkdir()
    with pytest.raises(APIError) as e:
        _control(tmp_path).dump("taken.npz")
    assert e.value.status == 409 and e.value.param == "path" and "is a directory" in e.value.message
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(APIError) as e:
        _control(blocker / "traces").dump("t.npz")
    assert e.value.status == 500 and "trace_dir" in e.value.message and str(blocker / "traces") in e.value.message
    assert e.value.code == "trace_dir_unwritable"


def test_status_counts_without_building_the_trace(tmp_path, monkeypatch):
    """GET /v1/traces (and start/stop's answers) built the whole trace, hidden states included, under
    the lock every engine step takes: a long recording stalled serving on each status call."""
    from moe_serve.tracing.recorder import TraceRecorder

    control = _control(tmp_path)
    hook = control.hook
    for n, sid in ((3, 0), (1, 0), (2, 1)):
        batch = ForwardBatch(token_ids=torch.arange(n), positions=torch.arange(n), slot_ids=[sid], query_lens=[n],
                             context_lens=[0], seq_ids=[sid])
        hook.begin_step(batch)
        for layer in range(2):
            hook.route(layer, None, torch.zeros(n, 2, dtype=torch.long), torch.ones(n, 2))
        hook.end_step(batch)

    def no_build(self):
        raise AssertionError("status built the trace")

    monkeypatch.setattr(TraceRecorder, "to_trace", no_build)
    assert control.status() == {"recording": True, "sequences": 2, "tokens": 6}
    assert control.stop() == {"recording": False, "sequences": 2, "tokens": 6}
