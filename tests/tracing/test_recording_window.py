"""A recording switched on while requests run (POST /v1/traces/start on a live server)."""
from types import SimpleNamespace

import torch

from moe_serve.models import load_model
from moe_serve.models.batch import ForwardBatch
from moe_serve.server.traces import TraceControl


def _batch(*seqs) -> ForwardBatch:
    """seqs: (seq id = slot, first position, tokens) of each sequence in the step."""
    tokens, positions = [], []
    for _, start, toks in seqs:
        tokens += toks
        positions += range(start, start + len(toks))
    return ForwardBatch(token_ids=torch.tensor(tokens), positions=torch.tensor(positions),
                        slot_ids=[s[0] for s in seqs], query_lens=[len(s[2]) for s in seqs],
                        context_lens=[s[1] for s in seqs], seq_ids=[s[0] for s in seqs])


def test_sequences_running_when_recording_starts_are_left_out(tiny_checkpoint, tmp_path):
    """A sequence already decoding when the recording started was recorded from the middle, and the
    format has no positions: every consumer took its first row for position 0 (a replay of it fed
    mid-sequence routing to a prompt's first tokens; its token_ids lacked the prompt). Only sequences
    that begin while recording are recorded, whole, from position 0."""
    model = load_model(tiny_checkpoint("mixtral"))
    model.allocate_kv_cache(num_slots=2, max_len=16)
    control = TraceControl(SimpleNamespace(spec=model.spec, model=model), str(tmp_path))
    model(_batch((0, 0, [3, 4, 5])))  # sequence 0's prompt, before the start
    control.start()
    model(_batch((0, 3, [6]), (1, 0, [7, 8])))  # 0 decodes, 1 joins with its prompt
    model(_batch((0, 4, [9]), (1, 2, [10])))
    trace = control.hook.snapshot()
    assert trace.num_sequences == 1 and trace.token_ids.tolist() == [7, 8, 10]
    assert control.status() == {"recording": True, "sequences": 1, "tokens": 3}
