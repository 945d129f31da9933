"""Requests at the edges of what the engine accepts: a tokenizer that does not match its model,
SamplingParams changed after construction."""
import re
import shutil

import pytest

from moe_serve import LLM, SamplingParams
from moe_serve.config import EngineConfig
from moe_serve.engine import LLMEngine
from tests.engine.helpers import run

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


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


def test_sampling_params_set_after_construction_apply(tiny_dir):
    """vLLM's own example sets fields on `llm.get_default_sampling_params()`; a stop string set that way
    was silently ignored (the stop list was worked out once, at construction), and a value set out of
    range was never checked. Both are now read when the request is made."""
    with LLM(model=str(tiny_dir)) as llm:
        params = llm.get_default_sampling_params()
        params.temperature, params.max_tokens, params.ignore_eos = 0, 12, True
        full = llm.generate("Once upon a time", params)[0].text
        # two characters of the text's second half (not a replacement character: a byte held back)
        stop = next(full[i:i + 2] for i in range(len(full) // 2, len(full) - 1)
                    if full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2])
        assert full.index(stop) > 0
        for given in (stop, [stop]):
            params.stop = given
            out = llm.generate("Once upon a time", params)[0]
            assert (out.finish_reason, out.text) == ("stop", full[: full.index(stop)])
        params.stop = None
        assert llm.generate("Once upon a time", params)[0].text == full
        params.max_tokens = 0
        with pytest.raises(ValueError, match=r"prompts\[0\]: SamplingParams.max_tokens must be >= 1"):
            llm.generate("Once upon a time", params)


def test_generation_configs_eos_ids_end_a_request(tiny_dir, tmp_path):
    """Chat checkpoints list their end-of-turn token beside the end-of-text one in generation_config.json
    (Qwen's [<|im_end|>, <|endoftext|>]) while config.json names one. Only config.json's was a stop, so a
    reply ran on past its end of turn to max_tokens; every id of either file now ends it (as transformers'
    generate and vLLM do), and ignore_eos still generates past them."""
    import json

    params = SamplingParams(temperature=0, max_tokens=12)
    with LLM(model=str(tiny_dir)) as llm:
        ref = llm.generate("Once upon a time", params)[0]
    assert ref.finish_reason == "length"
    eos = json.loads((tiny_dir / "config.json").read_text())["eos_token_id"]
    end_of_turn = ref.token_ids[3]
    assert end_of_turn != eos
    out = shutil.copytree(tiny_dir, tmp_path / "ckpt")
    gen = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [end_of_turn, eos]}))
    with LLM(model=str(out)) as llm:
        stopped, ignored = llm.generate(["Once upon a time"] * 2, [params, SamplingParams(temperature=0, max_tokens=12,
                                                                                         ignore_eos=True)])
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == ref.token_ids[: ref.token_ids.index(end_of_turn) + 1]
    assert (ignored.finish_reason, ignored.token_ids) == ("length", ref.token_ids)


def test_a_kv_budget_that_caps_max_num_seqs_says_so(tiny_dir, caplog):
    """Every KV slot holds max_model_len tokens, so a budget for fewer slots than max_num_seqs ran fewer
    requests at once, silently (by default a big model's max_model_len takes the whole budget: one
    request at a time). The engine now warns at start, naming both fields and what it can run."""
    import logging

    per_slot = 2 * 2 * 16 * 2 * 4 * 256  # layers x kv heads x head_dim x (K, V) x fp32 bytes x max_model_len
    with caplog.at_level(logging.WARNING, logger="moe_serve"):
        eng = LLMEngine(EngineConfig.from_flat(model=str(tiny_dir), max_model_len=256, max_num_seqs=8,
                                               kv_cache_gb=3.5 * per_slot / 2**30))
    assert eng.num_slots == 3
    warned = [r.getMessage() for r in caplog.records if "max_num_seqs" in r.getMessage()]
    assert len(warned) == 1 and all(s in warned[0] for s in ("kv_cache.kv_cache_gb=", "3 sequences of model.max_model_len=256",
                                                            "kv_cache.max_num_seqs=8", "at most 3 requests run at once"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moe_serve"):
        assert LLMEngine(EngineConfig.from_flat(model=str(tiny_dir), max_model_len=256, max_num_seqs=3,
                                                kv_cache_gb=3.5 * per_slot / 2**30)).num_slots == 3
    assert not [r for r in caplog.records if "max_num_seqs" in r.getMessage()]


@pytest.mark.parametrize("option, value, says", [
    ("max_num_seqs", "8", "kv_cache.max_num_seqs must be an integer, got '8'"),
    ("max_model_len", 100.5, "model.max_model_len must be an integer or None, got 100.5"),
    ("kv_cache_gb", "0.5", "kv_cache.kv_cache_gb must be a number, got '0.5'"),
    ("compile_decode", "yes", "model.compile_decode must be true or false, got 'yes'"),
    ("max_num_seqs", True, "kv_cache.max_num_seqs must be an integer, got True"),
])
def test_llm_options_of_the_wrong_type_name_the_field(tiny_dir, option, value, says):
    """LLM(max_num_seqs="8") (a value read from the environment, say) failed inside the section's checks
    with "'>=' not supported between instances of 'str' and 'int'", naming no option; a float length got
    as far as allocating the KV cache. Options are checked against their field's type first."""
    with pytest.raises(ValueError, match=re.escape(says)):
        LLM(model=str(tiny_dir), **{option: value})


def test_llm_options_of_other_numeric_and_path_types_are_taken(tiny_dir):
    import numpy as np

    with LLM(model=tiny_dir, max_num_seqs=np.int64(2), kv_cache_gb=np.float32(0.25), max_model_len=64) as llm:
        assert llm.engine.num_slots == 2 and llm.engine.max_model_len == 64


def test_an_engine_used_after_close_says_it_is_closed(tiny_dir):
    """LLMEngine.close() drops the model; a request added after it was taken, then ended with
    "AttributeError: 'NoneType' object has no attribute 'forward'", and one queued before it (aborted by
    close) was still stepped into that error. Adding one now raises, saying so, and the queue is emptied."""
    eng = LLMEngine(EngineConfig.from_flat(model=str(tiny_dir)))
    eng.add_request("The quick", GREEDY, "before")
    eng.close()
    with pytest.raises(RuntimeError, match="engine is closed"):
        eng.add_request("The quick", GREEDY, "after")
    assert not eng.has_unfinished() and eng.step() == []


def test_sampling_params_per_prompt_as_a_tuple(tiny_dir):
    """vLLM takes any sequence of SamplingParams, one per prompt; a tuple was taken for one SamplingParams
    and refused as 'prompts[0]: params must be a SamplingParams, got tuple', blaming the prompt."""
    with LLM(model=str(tiny_dir)) as llm:
        short, longer = SamplingParams(temperature=0, max_tokens=2), SamplingParams(temperature=0, max_tokens=5)
        outs = llm.generate(["The quick", "Once upon"], (short, longer))
        assert [len(o.token_ids) for o in outs] == [2, 5]
        with pytest.raises(ValueError, match=r"sampling_params: got 1 for 2 prompts"):
            llm.generate(["The quick", "Once upon"], (short,))


def test_option_type_check_leaves_container_fields_to_their_section():
    """check_types read list[int] as int (typing.get_args of a generic gives its item type) and would
    refuse every list; only plain and optional scalar fields are checked."""
    from dataclasses import dataclass

    from moe_serve.config_types import check_types

    @dataclass
    class Section:
        ids: list[int]
        size: int | None = None

    check_types("s", Section, {"ids": [1, 2], "size": None})
    with pytest.raises(ValueError, match=re.escape("s.size must be an integer or None, got '3'")):
        check_types("s", Section, {"size": "3"})


def test_changing_the_sampling_params_after_submit_leaves_the_request_alone(tiny_dir):
    # the engine kept the caller's SamplingParams: reusing it for the next request (changing max_tokens,
    # temperature, logprobs) changed the running one, and the engine's count of requests needing logprobs
    # or penalties (read at submit and at finish) went to -1, so a later such request sampled plainly
    from moe_serve.config import EngineConfig
    from moe_serve.engine import LLMEngine, SamplingParams
    from tests.engine.helpers import run

    eng = LLMEngine(EngineConfig.from_flat(model=str(tiny_dir)))
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    eng.add_request("The quick brown fox", sp, "clean")
    want = run(eng)["clean"].token_ids
    eng.add_request("The quick brown fox", sp, "reused")
    eng.step()
    sp.temperature, sp.max_tokens, sp.logprobs, sp.stop_token_ids = 1.0, 2, 3, [want[2]]
    got = run(eng)["reused"]
    assert got.token_ids == want and got.logprobs is None and got.finish_reason == "length"
    assert eng._num_extras == 0
    pen = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, repetition_penalty=1.5)
    eng.add_request("The quick brown fox", pen, "penalized")
    alone = LLMEngine(EngineConfig.from_flat(model=str(tiny_dir)))
    alone.add_request("The quick brown fox", pen, "penalized")
    assert run(eng)["penalized"].token_ids == run(alone)["penalized"].token_ids
