"""Trace files at the edges: paths the recorder is given, malformed archives the loader is given."""
import numpy as np
import pytest

from moe_serve import LLM, SamplingParams
from predictors.traces import load_trace

GREEDY = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


def test_record_trace_writes_the_path_given_and_checks_it_before_the_run(tiny_dir, tmp_path):
    rec = tmp_path / "rec"  # no .npz suffix: numpy would write rec.npz, and the user looks for rec
    with LLM(model=str(tiny_dir), record_trace=str(rec)) as llm:
        llm.generate(["hi there"], GREEDY)
    assert rec.is_file() and not (tmp_path / "rec.npz").exists()
    assert load_trace(rec).num_sequences == 1

    folder = tmp_path / "adir"  # was silently written to adir.npz beside it, after the whole run
    folder.mkdir()
    with pytest.raises(ValueError, match=r"trace\.record_trace .*adir: is a directory"):
        LLM(model=str(tiny_dir), record_trace=str(folder))
    blocker = tmp_path / "file"  # a parent that is a file: was a bare FileNotFoundError at close, after the run
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"trace\.record_trace .*cannot create its directory"):
        LLM(model=str(tiny_dir), record_trace=str(blocker / "x.npz"))
