"""vLLM's keyword options of LLM.generate that scripts pass: use_tqdm (a progress bar over finished prompts)
and lora_request (None only: moe-serve serves no LoRA adapters)."""
import io

import pytest
from tqdm import tqdm

from moe_serve import LLM, SamplingParams

PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
PROMPTS = ["The quick brown fox", "Once upon a time", "def add(a, b):"]


class QuietBar(tqdm):
    """A real tqdm writing to a buffer, kept so the test can read how far it got."""
    made: list["QuietBar"] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, file=io.StringIO(), **kwargs)
        QuietBar.made.append(self)


def test_use_tqdm_and_lora_request_none_are_accepted(tiny_dir, capfd):
    with LLM(model=str(tiny_dir), max_num_seqs=2) as llm:
        want = [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]
        assert capfd.readouterr().err == ""  # quiet unless asked
        assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False, lora_request=None)] == want
        assert capfd.readouterr().err == ""
        assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=True)] == want
        err = capfd.readouterr().err
        assert "Processed prompts" in err and "3/3" in err
        n2 = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, n=2)
        outs = llm.generate(PROMPTS[:2], n2, use_tqdm=QuietBar)  # a callable: vLLM builds the bar with it
        assert [len(o.outputs) for o in outs] == [2, 2]
        (bar,) = QuietBar.made
        assert (bar.n, bar.total) == (2, 2)  # prompts, not completions


def test_unsupported_values_are_refused_by_name(tiny_dir):
    with LLM(model=str(tiny_dir)) as llm:
        with pytest.raises(ValueError, match="lora_request: LoRA adapters are not supported"):
            llm.generate(PROMPTS[0], PARAMS, lora_request=object())
        with pytest.raises(ValueError, match="use_tqdm must be a bool or a tqdm-like callable, got str"):
            llm.generate(PROMPTS[0], PARAMS, use_tqdm="yes")
        assert llm.engine.num_waiting == 0 and not llm.engine.has_unfinished()  # nothing was queued
        assert len(llm.generate(PROMPTS[0], PARAMS)[0].token_ids) == 4
