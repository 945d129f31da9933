"""Loading: config.json fields that are out of range, of the wrong type or inconsistent are refused
naming the field (and `moe-serve info` refuses them the same way)."""
from __future__ import annotations

import re

import pytest

from moe_serve.models import CheckpointError, UnsupportedModelError, load_model
from tests.models.checkpoint_edits import copy, edit_config


@pytest.mark.parametrize("family, field, value", [
    ("mixtral", "hidden_size", -64), ("mixtral", "num_hidden_layers", "3"), ("qwen3_moe", "vocab_size", 0),
    ("qwen2_moe", "num_experts", True), ("olmoe", "intermediate_size", 32.0), ("qwen3_moe", "head_dim", -24),
    ("deepseek_v3", "num_hidden_layers", 0), ("deepseek_v2", "kv_lora_rank", -32), ("deepseek_v3", "q_lora_rank", "48"),
])
def test_config_sizes_must_be_positive_integers(tiny_checkpoint, tmp_path, capsys, family, field, value):
    """A bad size names its field: before, -64 and "3" failed deep in torch (RuntimeError, TypeError)
    and `moe-serve info` printed a traceback, or the fine-looking model loaded until its first forward."""
    from moe_serve.cli.main import main

    d = edit_config(tiny_checkpoint(family), tmp_path, **{field: value})
    with pytest.raises(ValueError, match=f"'{field}' must be a positive integer, got {value!r}"):
        load_model(d)
    assert main(["info", str(d)]) == 2
    assert f"'{field}' must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_rms_norm_eps_must_be_a_positive_number_and_null_means_the_default(tiny_checkpoint, tmp_path, family):
    """Before, null failed in RMSNorm with a TypeError and a string at the first forward."""
    for value in ("1e-6", -1.0, True):
        with pytest.raises(ValueError, match=re.escape(f"'rms_norm_eps' must be a positive number, got {value!r}")):
            load_model(edit_config(tiny_checkpoint(family), tmp_path / str(value), rms_norm_eps=value))
    default = load_model(edit_config(tiny_checkpoint(family), tmp_path / "null", rms_norm_eps=None))
    assert default.spec.rms_norm_eps > 0


def test_architectures_as_one_string_is_that_architecture(mixtral_dir, tmp_path):
    """Before, a string was read letter by letter (no letter is an architecture) and, with model_type
    removed too, the error listed the letters."""
    d = edit_config(mixtral_dir, tmp_path, architectures="MixtralForCausalLM", model_type=None)
    assert load_model(d).spec.family == "mixtral"
    with pytest.raises(ValueError, match="'architectures' must be a list of class names, got 5"):
        load_model(edit_config(mixtral_dir, tmp_path / "int", architectures=5))


@pytest.mark.parametrize("changes, message", [
    (dict(num_attention_heads=4, num_key_value_heads=3), r"'num_attention_heads' \(4\) must be a multiple of "
                                                         r"'num_key_value_heads' \(3\)"),
    (dict(num_attention_heads=128, hidden_size=64), r"hidden_size \(64\) / num_attention_heads \(128\) gives head_dim 0"),
])
def test_config_head_counts_must_fit(mixtral_dir, tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        load_model(edit_config(mixtral_dir, tmp_path, **changes))


@pytest.mark.parametrize("family, experts_field", [("mixtral", "num_local_experts"), ("qwen2_moe", "num_experts"),
                                                   ("olmoe", "num_experts"), ("deepseek_v3", "n_routed_experts")])
def test_top_k_above_expert_count_is_refused(tiny_checkpoint, tmp_path, capsys, family, experts_field):
    """Before, this loaded (and `moe-serve info` described it) and failed at the first forward in torch.topk."""
    from moe_serve.cli.main import main

    d = edit_config(tiny_checkpoint(family), tmp_path, num_experts_per_tok=99)
    message = f"'num_experts_per_tok' (99) must be <= '{experts_field}'"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_model(d)
    assert main(["info", str(d)]) == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("family, changes", [("deepseek_v3", dict(first_k_dense_replace=3)),
                                             ("qwen2_moe", dict(mlp_only_layers=[0, 1, 2])),
                                             ("qwen3_moe", dict(decoder_sparse_step=4))])
def test_config_without_moe_layers_is_refused(tiny_checkpoint, tmp_path, family, changes):
    """Before, the resident store failed with 'needs one gate_up and one down tensor per MoE layer'."""
    with pytest.raises(UnsupportedModelError, match="makes none of the 3 layers .* an MoE layer"):
        load_model(edit_config(tiny_checkpoint(family), tmp_path, **changes))


def test_config_not_utf8_names_the_file(mixtral_dir, tmp_path):
    d = copy(mixtral_dir, tmp_path)
    (d / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_model(d)


def test_unsupported_checkpoint_dtype_blames_config_json(mixtral_dir, tmp_path):
    """dtype=auto with config.json's dtype float64 said 'dtype must be auto or one of ...', blaming the caller.
    An explicit dtype no longer gets past it either (test_checkpoint_errors.py: info and the loader agree)."""
    d = edit_config(mixtral_dir, tmp_path, dtype="float64")
    for dtype in ("auto", "float32"):
        with pytest.raises(ValueError, match="config.json field 'dtype' must be one of .*, got 'float64'"):
            load_model(d, dtype=dtype)
