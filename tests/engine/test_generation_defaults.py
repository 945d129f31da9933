"""The checkpoint's generation_config.json sampling defaults: how they are read and checked, and that
`LLM.generate` without SamplingParams uses them (vLLM's `get_default_sampling_params`)."""
from __future__ import annotations

import json
import shutil

import pytest

from moe_serve import LLM, SamplingParams
from moe_serve.config import ModelConfig
from moe_serve.engine.generation_defaults import read_generation_defaults


def write_generation_config(model_dir, text: str) -> None:
    (model_dir / "generation_config.json").write_text(text)


def test_absent_file_gives_no_defaults(tmp_path):
    assert read_generation_defaults(tmp_path) == {}


def test_reads_the_sampling_fields_vllm_reads(tmp_path):
    write_generation_config(tmp_path, json.dumps({
        "do_sample": False, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 128,
        "repetition_penalty": 1.1, "min_p": 0.05, "eos_token_id": [1, 2], "num_beams": 1}))
    # do_sample, min_p: ignored (vLLM ignores do_sample; min_p is not implemented)
    assert read_generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_tokens": 128,
                                                  "repetition_penalty": 1.1}


def test_null_fields_count_as_unset(tmp_path):
    write_generation_config(tmp_path, '{"temperature": null, "top_k": 0}')
    assert read_generation_defaults(tmp_path) == {"top_k": 0}


@pytest.mark.parametrize("text, says", [
    ("{not json", "not valid JSON"),
    ("[0.7]", "must be a JSON object, got list"),
    ('{"temperature": -0.1}', "temperature must be a number in [0, 100], got -0.1"),
    ('{"temperature": "0.7"}', "temperature must be a number in [0, 100], got '0.7'"),
    ('{"temperature": true}', "temperature must be a number in [0, 100], got True"),
    ('{"temperature": NaN}', "temperature must be a number in [0, 100], got nan"),
    ('{"top_p": 0}', "top_p must be a number in (0, 1], got 0"),
    ('{"top_p": 1.5}', "top_p must be a number in (0, 1], got 1.5"),
    ('{"top_k": -2}', "top_k must be an integer >= -1"),
    ('{"top_k": 40.0}', "top_k must be an integer >= -1"),
    ('{"max_new_tokens": 0}', "max_new_tokens must be an integer >= 1, got 0"),
    ('{"max_new_tokens": false}', "max_new_tokens must be an integer >= 1, got False"),
    ('{"repetition_penalty": 0}', "repetition_penalty must be a finite number > 0, got 0"),
])
def test_a_bad_file_is_an_error_naming_the_file_field_and_limit(tmp_path, text, says):
    write_generation_config(tmp_path, text)
    with pytest.raises(ValueError) as err:
        read_generation_defaults(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'generation_config.json'}: ")
    assert says in str(err.value)


def test_generation_config_option_is_auto_or_none():
    assert ModelConfig().generation_config == "auto"
    with pytest.raises(ValueError, match="model.generation_config must be auto or none, got 'vllm'"):
        ModelConfig(generation_config="vllm")


@pytest.fixture(scope="module")
def greedy_default_dir(tiny_dir, tmp_path_factory):
    """The tiny checkpoint whose generation_config.json asks for greedy decoding and 5 new tokens."""
    path = tmp_path_factory.mktemp("gen_defaults") / "tiny-greedy-default"
    shutil.copytree(tiny_dir, path)
    config = json.loads((path / "generation_config.json").read_text())
    write_generation_config(path, json.dumps({**config, "temperature": 0.0, "max_new_tokens": 5}))
    return path


def test_llm_generate_without_params_uses_the_checkpoints_defaults(greedy_default_dir):
    prompt = "Once upon a time"
    with LLM(model=str(greedy_default_dir), max_num_seqs=2) as llm:
        defaults = llm.get_default_sampling_params()
        assert (defaults.temperature, defaults.max_tokens) == (0.0, 5)
        assert (defaults.top_p, defaults.top_k) == (1.0, -1)  # not in the file: SamplingParams' own
        greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=5))[0]
        unset = llm.generate(prompt)[0]
        assert unset.token_ids == greedy.token_ids and len(unset.token_ids) <= 5
        sampled = llm.generate(prompt, SamplingParams(temperature=1.0, seed=0, max_tokens=12, ignore_eos=True))[0]
        assert len(sampled.token_ids) == 12  # an explicit SamplingParams owes nothing to the file


def test_generation_config_none_keeps_the_built_in_defaults(greedy_default_dir):
    with LLM(model=str(greedy_default_dir), max_num_seqs=1, generation_config="none") as llm:
        assert llm.get_default_sampling_params() == SamplingParams()
