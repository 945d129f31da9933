"""config.json fields of the wrong type or out of range: refused by load_model and `moe-serve info` alike,
naming the field, the limit and the value (before, many loaded: "false" read as true, -1 as a count)."""
from __future__ import annotations

import re

import pytest

from moe_serve.cli.main import main
from moe_serve.models import load_model
from tests.models.checkpoint_edits import edit_config

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128}
CASES = [  # (family, config.json changes, the message's start after "config.json field ")
    # read with bool(): the string "false" is truthy, so these were silently true
    ("mixtral", dict(tie_word_embeddings="false"), "'tie_word_embeddings' must be true or false, got 'false'"),
    ("qwen2_moe", dict(norm_topk_prob="false"), "'norm_topk_prob' must be true or false, got 'false'"),
    ("qwen2_moe", dict(qkv_bias="false"), "'qkv_bias' must be true or false"),
    ("qwen2_moe", dict(use_sliding_window="no"), "'use_sliding_window' must be true or false"),
    ("qwen3_moe", dict(attention_bias="false"), "'attention_bias' must be true or false"),
    ("olmoe", dict(norm_topk_prob=1), "'norm_topk_prob' must be true or false, got 1"),
    ("deepseek_v3", dict(rope_interleave="false"), "'rope_interleave' must be true or false"),
    # sizes and counts: loaded (negative sliding window, max positions), or a TypeError traceback
    ("mixtral", dict(max_position_embeddings=-5), "'max_position_embeddings' must be a positive integer, got -5"),
    ("mixtral", dict(max_position_embeddings="x"), "'max_position_embeddings' must be a positive integer"),
    ("mixtral", dict(sliding_window=-3), "'sliding_window' must be a positive integer, got -3"),
    ("mixtral", dict(sliding_window="x"), "'sliding_window' must be a positive integer, got 'x'"),
    ("qwen2_moe", dict(decoder_sparse_step=-1), "'decoder_sparse_step' must be a positive integer, got -1"),
    ("qwen2_moe", dict(mlp_only_layers=[7]), "'mlp_only_layers' must be a list of layer ids in [0, 3)"),
    ("qwen2_moe", dict(mlp_only_layers="1"), "'mlp_only_layers' must be a list of layer ids in [0, 3)"),
    ("qwen2_moe", dict(shared_expert_intermediate_size=-8), "'shared_expert_intermediate_size' must be an integer >= 0"),
    ("olmoe", dict(clip_qkv=-1), "'clip_qkv' must be a number > 0, got -1"),
    ("olmoe", dict(clip_qkv="x"), "'clip_qkv' must be a number > 0, got 'x'"),
    ("deepseek_v3", dict(first_k_dense_replace="1"), "'first_k_dense_replace' must be an integer >= 0, got '1'"),
    ("deepseek_v3", dict(first_k_dense_replace=-1), "'first_k_dense_replace' must be an integer >= 0, got -1"),
    ("deepseek_v3", dict(moe_layer_freq="2"), "'moe_layer_freq' must be a positive integer, got '2'"),
    ("deepseek_v3", dict(n_group="4"), "'n_group' must be a positive integer, got '4'"),
    ("deepseek_v3", dict(topk_group=0), "'topk_group' must be a positive integer, got 0"),
    # V3 scores a group by the sum of its top 2 experts: with 1 a group, torch.topk failed at the first forward
    ("deepseek_v3", dict(n_group=16, topk_group=4), "'n_group' (16) must leave at least 2 experts a group "
                                                    "(n_routed_experts 16): V3 scores a group by its top-2 sum"),
    ("deepseek_v3", dict(n_shared_experts=-1), "'n_shared_experts' must be an integer >= 0, got -1"),
    ("deepseek_v3", dict(routed_scaling_factor="x"), "'routed_scaling_factor' must be a number > 0, got 'x'"),
    ("deepseek_v2", dict(routed_scaling_factor=-1.0), "'routed_scaling_factor' must be a number > 0, got -1.0"),
    # token ids: "invalid literal for int()" naming no field, or a list with a string in it loaded
    ("mixtral", dict(eos_token_id="x"), "'eos_token_id' must be a token id or a list of token ids, got 'x'"),
    ("mixtral", dict(eos_token_id=[2, "x"]), "'eos_token_id' must be a token id or a list of token ids"),
    ("deepseek_v3", dict(bos_token_id=-1), "'bos_token_id' must be a token id (an integer >= 0) or null, got -1"),
    # rope: a non-object was a TypeError traceback; bad numbers loaded, or failed unnamed at the first forward
    ("mixtral", dict(rope_parameters=3), "'rope_parameters' must be an object, got 3"),
    ("mixtral", dict(rope_parameters=[1, 2]), "'rope_parameters' must be an object, got [1, 2]"),
    ("mixtral", dict(rope_parameters=None, rope_scaling="linear"), "'rope_scaling' must be an object, got 'linear'"),
    ("mixtral", dict(rope_parameters={"rope_type": "linear", "factor": -2}),
     "'rope_parameters.factor' must be a number > 0, got -2"),
    ("mixtral", dict(rope_parameters={"rope_type": "linear", "factor": "x"}),
     "'rope_parameters.factor' must be a number > 0, got 'x'"),
    ("mixtral", dict(rope_parameters={"rope_type": "default", "rope_theta": -1}),
     "'rope_parameters.rope_theta' must be a number > 1, got -1"),
    ("mixtral", dict(rope_parameters=None, rope_theta="abc"), "'rope_theta' must be a number > 1, got 'abc'"),
    ("qwen3_moe", dict(rope_parameters={**YARN, "original_max_position_embeddings": -3}),
     "'rope_parameters.original_max_position_embeddings' must be a positive integer, got -3"),
    ("qwen3_moe", dict(rope_parameters={**YARN, "attention_factor": "x"}),
     "'rope_parameters.attention_factor' must be a number > 0, got 'x'"),
    ("qwen3_moe", dict(rope_parameters={**YARN, "mscale": "x", "mscale_all_dim": 1}),
     "'rope_parameters.mscale' must be a number, got 'x'"),
    ("qwen3_moe", dict(rope_parameters={**YARN, "beta_fast": 0}), "'rope_parameters.beta_fast' must be a number > 0"),
    ("qwen3_moe", dict(rope_parameters={k: v for k, v in YARN.items() if k != "factor"}, max_position_embeddings="x"),
     "'max_position_embeddings' must be a positive integer, got 'x'"),
    ("mixtral", dict(rope_parameters={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 4.0,
                                      "high_freq_factor": 1.0, "original_max_position_embeddings": 128}),
     "'rope_parameters.high_freq_factor' (1.0) must be > 'rope_parameters.low_freq_factor' (4.0)"),
]


@pytest.mark.parametrize("family, changes, message", CASES,
                         ids=[f"{f}-{'-'.join(c)}-{i}" for i, (f, c, _) in enumerate(CASES)])
def test_config_field_out_of_range_is_refused(tiny_checkpoint, tmp_path, capsys, family, changes, message):
    d = edit_config(tiny_checkpoint(family), tmp_path, **changes)
    capsys.readouterr()  # the fixture's progress bar, when it wrote the checkpoint
    with pytest.raises(ValueError, match=re.escape(f"config.json field {message}")) as err:
        load_model(d)
    assert main(["info", str(d)]) == 2
    assert capsys.readouterr().err.strip() == f"moe-serve info: error: {err.value}"


def test_unknown_rope_type_names_the_field(tiny_checkpoint, tmp_path):
    d = edit_config(tiny_checkpoint("mixtral"), tmp_path, rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match=re.escape("rope type 'dynamic' is not supported (config.json field "
                                                   "'rope_parameters.rope_type'; supported: default, linear")):
        load_model(d)


@pytest.mark.parametrize("family, changes", [
    ("mixtral", dict(tie_word_embeddings=None, sliding_window=None, eos_token_id=[2, 3], bos_token_id=None)),
    ("qwen2_moe", dict(norm_topk_prob=True, mlp_only_layers=[1], decoder_sparse_step=None)),
    ("deepseek_v3", dict(first_k_dense_replace=1, moe_layer_freq=None, n_shared_experts=1, rope_interleave=None)),
])
def test_null_and_plain_values_still_load(tiny_checkpoint, tmp_path, family, changes):
    """The checks refuse bad values, not absent ones: null keeps the family's default."""
    load_model(edit_config(tiny_checkpoint(family), tmp_path, **changes))
