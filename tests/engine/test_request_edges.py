"""Requests at the edges of what the engine accepts: a tokenizer that does not match its model,
SamplingParams changed after construction."""
import shutil

import pytest

from moe_serve import LLM, SamplingParams
from moe_serve.config import EngineConfig
from moe_serve.engine import LLMEngine

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def run(eng):
    """Step until nothing is left; {request_id: final output}."""
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    return done


@pytest.fixture
def added_token_dir(tiny_dir, tmp_path):
    """The tiny checkpoint whose tokenizer.json has one added token past the model's 384-row embedding
    (as checkpoints whose tokenizer gained tool-call or chat tokens the model was never resized for)."""
    from tokenizers import Tokenizer

    out = shutil.copytree(tiny_dir, tmp_path / "ckpt")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_tokens(["<tool_call>"])
    tok.save(str(out / "tokenizer.json"))
    return out


def test_a_text_prompt_past_the_vocabulary_is_refused_naming_the_limit(added_token_dir):
    """It reached the forward, where the embedding lookup failed (IndexError on a CPU, a device-side
    assert that ends the CUDA context on a GPU); it is refused when added, naming the field and the limit."""
    eng = LLMEngine(EngineConfig.from_flat(model=str(added_token_dir)))
    assert 384 in eng.tokenizer.encode("hi <tool_call> there")
    with pytest.raises(ValueError, match=r"prompt: the tokenizer gave token ids past the model's vocabulary "
                                         r"\(vocab_size=384\): \[384\]"):
        eng.add_request("hi <tool_call> there", GREEDY, "bad")
    eng.add_request("The quick brown fox", GREEDY, "good")
    assert run(eng)["good"].finish_reason == "length"
    with LLM(model=str(added_token_dir)) as llm:
        with pytest.raises(ValueError, match=r"prompts\[1\]: prompt: the tokenizer gave token ids"):
            llm.generate(["The quick", "<tool_call>"], GREEDY)
