"""Rotary frequency rules against transformers' ROPE_INIT_FUNCTIONS (inv_freq and attention factor)."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from moe_serve.models.families.common import rope_spec
from moe_serve.models.rope import inv_freq_and_scale

CASES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256},
    "yarn_mscale": {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 128, "mscale": 1.0,
                    "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rope_variant_matches_transformers(name):
    params = {"rope_theta": 50000.0, **CASES[name]}
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=4096,
                      rope_parameters=dict(params))
    ref_inv, ref_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu")
    raw = {"rope_parameters": dict(params), "max_position_embeddings": 4096}
    inv, scale = inv_freq_and_scale(rope_spec(raw, 64, default_theta=10000.0))
    torch.testing.assert_close(inv, ref_inv.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(ref_scale)


def test_old_style_rope_scaling_and_unknown_type():
    old = {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}, "max_position_embeddings": 64}
    r = rope_spec(old, 32, default_theta=1e4)
    assert (r.kind, r.theta, r.factor) == ("linear", 5e5, 2.0)
    with pytest.raises(ValueError, match="rope type 'dynamic' is not supported"):
        rope_spec({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, 32, default_theta=1e4)
