"""Config variants real checkpoints use, beyond the one config per family of test_families_vs_hf.py,
each against transformers on a tiny random checkpoint written by save_pretrained: prefill logits
within 1e-4 relative (fp32), identical expert choices per MoE layer, identical greedy continuation.
A variant moe-serve cannot follow is refused at load with an error naming the field."""
from __future__ import annotations

import pytest
import torch

from moe_serve.models import load_model
from moe_serve.models.spec import UnsupportedModelError
from tests.models.tiny_checkpoints import make_tiny_checkpoint


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_moe_layer_freq_above_one_is_refused_naming_the_field(family, tmp_path):
    """transformers ignores moe_layer_freq (every layer from first_k_dense_replace on is MoE) while
    DeepSeek's reference code keeps only every freq-th one: the two read such a config differently,
    and moe-serve followed the reference, then failed on a tensor name when given transformers' layout."""
    d = make_tiny_checkpoint(family, tmp_path, num_hidden_layers=4, first_k_dense_replace=1, moe_layer_freq=2)
    with pytest.raises(UnsupportedModelError, match=r"'moe_layer_freq' \(2\)"):
        load_model(d)
    load_model(make_tiny_checkpoint(family, tmp_path / "one", moe_layer_freq=1))  # the published value loads
