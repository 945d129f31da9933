"""POST /v1/traces/dump answers with the counts of the file it wrote, not of the recording as it stands
once the write ends (the write takes seconds for a big trace; recording goes on meanwhile)."""
import threading
from types import SimpleNamespace

import torch

from moe_serve.models import load_model
from moe_serve.models.batch import ForwardBatch
from moe_serve.server.traces import TraceControl
from predictors.traces import load_trace


def _prompts(n: int, first: int = 0) -> ForwardBatch:
    return ForwardBatch(token_ids=torch.tensor([1, 2, 3] * n), positions=torch.arange(3).repeat(n),
                        slot_ids=list(range(first, first + n)), query_lens=[3] * n, context_lens=[0] * n,
                        seq_ids=list(range(first, first + n)))


class _MeanwhileEvent(threading.Event):
    """The dump's stop event; the first time the write asks it, `meanwhile()` runs, as a step or request
    handled on another thread while the trace is written would."""

    def __init__(self, meanwhile):
        super().__init__()
        self.meanwhile = meanwhile

    def is_set(self) -> bool:
        if self.meanwhile is not None:
            self.meanwhile, run = None, self.meanwhile
            run()
        return super().is_set()


def test_dump_reports_the_counts_of_the_file_it_wrote(tiny_checkpoint, tmp_path):
    model = load_model(tiny_checkpoint("mixtral"))
    model.allocate_kv_cache(num_slots=4, max_len=16)
    control = TraceControl(SimpleNamespace(spec=model.spec, model=model), str(tmp_path))
    control.start()
    model(_prompts(2))  # 2 sequences, 6 tokens recorded before the dump
    answer = control.dump("a.npz", _MeanwhileEvent(lambda: model(_prompts(2, first=2))))  # 2 more meanwhile
    written = load_trace(answer["path"])
    assert (written.num_sequences, written.num_tokens) == (2, 6)
    assert (answer["sequences"], answer["tokens"]) == (2, 6), answer  # old code: (4, 12), the recording's
    assert control.status()["tokens"] == 12 and answer["recording"] is True
    # a new recording started while the dump is written: the answer still describes the file
    answer = control.dump("b.npz", _MeanwhileEvent(control.start))
    assert (answer["sequences"], answer["tokens"]) == (4, 12) == (load_trace(answer["path"]).num_sequences,
                                                                  load_trace(answer["path"]).num_tokens), answer
    assert control.status()["tokens"] == 0
