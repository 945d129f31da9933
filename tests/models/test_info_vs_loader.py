"""`moe-serve info` refuses what the loader refuses, and describes every family from tensor headers only."""
from __future__ import annotations

import pytest
import torch

from moe_serve.models import CheckpointError, UnsupportedModelError, load_model
from tests.models.checkpoint_edits import edit_config, fuse_experts, rewrite_tensors


def _set(key, value):
    def edit(sd):
        sd[key] = value
    return edit


def _delete(key):
    def edit(sd):
        del sd[key]
    return edit


def _cast(key, dtype):
    def edit(sd):
        sd[key] = sd[key].to(dtype)
    return edit


def _fused_then(edit):
    def both(sd):
        fuse_experts(sd)
        edit(sd)
    return both


REFUSED = {  # what load_model refuses, and `moe-serve info` must refuse the same way
    "missing dense tensor": (_delete("model.layers.0.self_attn.k_proj.weight"), "k_proj.weight' is missing"),
    "missing expert tensor": (_delete("model.layers.2.block_sparse_moe.experts.5.w3.weight"),
                              "experts.5.w3.weight' is missing"),
    "missing lm_head": (_delete("lm_head.weight"), "'lm_head.weight' is missing and tie_word_embeddings is false"),
    "wrong dense shape": (_set("model.layers.1.self_attn.q_proj.weight", torch.zeros(60, 64)),
                          "q_proj.weight' has shape [60, 64], expected [64, 64]"),
    "wrong expert shape": (_set("model.layers.1.block_sparse_moe.experts.7.w2.weight", torch.zeros(64, 40)),
                           "experts.7.w2.weight' has shape [64, 40], expected [64, 48]"),
    "wrong fused expert shape": (_fused_then(_set("model.layers.2.mlp.experts.down_proj", torch.zeros(8, 64, 40))),
                                 "down_proj' has shape [8, 64, 40], expected [8, 64, 48]"),
    "int8 dense tensor": (_cast("model.embed_tokens.weight", torch.int8),
                          "'model.embed_tokens.weight' has dtype torch.int8; only float32/bfloat16/float16"),
    "fp8 expert tensor": (_cast("model.layers.0.block_sparse_moe.experts.3.w1.weight", torch.float8_e4m3fn),
                          "experts.3.w1.weight' has dtype torch.float8_e4m3fn; only float32/bfloat16/float16"),
    "fp8 fused expert tensor": (_fused_then(_cast("model.layers.1.mlp.experts.gate_up_proj", torch.float8_e5m2)),
                                "gate_up_proj' has dtype torch.float8_e5m2"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_info_refuses_what_the_loader_refuses(mixtral_dir, tmp_path, capsys, case):
    """`moe-serve info` described these checkpoints and exited 0 while `generate` failed loading them;
    now both report the same problem (info from the headers, exit 2)."""
    from moe_serve.cli.main import main

    edit, message = REFUSED[case]
    d = rewrite_tensors(mixtral_dir, tmp_path, edit)
    with pytest.raises(CheckpointError) as err:
        load_model(d)
    assert message in str(err.value)
    assert main(["info", str(d)]) == 2
    assert capsys.readouterr().err.strip() == f"moe-serve info: error: {err.value}"


def test_info_refuses_a_quantization_config(mixtral_dir, tmp_path, capsys):
    from moe_serve.cli.main import main

    d = edit_config(mixtral_dir, tmp_path, quantization_config={"quant_method": "fp8"})
    with pytest.raises(UnsupportedModelError, match="quant_method='fp8'") as err:
        load_model(d)
    assert main(["info", str(d)]) == 2
    assert capsys.readouterr().err.strip() == f"moe-serve info: error: {err.value}"


@pytest.fixture
def no_tensor_data(monkeypatch):
    """Any read of tensor data from a safetensors file (get_tensor, or indexing a slice) fails the test."""
    from moe_serve.models import checkpoint

    real_open = checkpoint.safe_open

    class Slice:
        def __init__(self, sl):
            self._sl = sl

        def __getattr__(self, name):
            return getattr(self._sl, name)

        def __getitem__(self, index):
            raise AssertionError("tensor data was read")

    class Handle:
        def __init__(self, h):
            self._h = h

        def __getattr__(self, name):
            return getattr(self._h, name)

        def get_tensor(self, key):
            raise AssertionError(f"tensor data was read ({key})")

        def get_slice(self, key):
            return Slice(self._h.get_slice(key))

    monkeypatch.setattr(checkpoint, "safe_open", lambda *a, **k: Handle(real_open(*a, **k)))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v2_qlora",
                                    "deepseek_v3"])
def test_info_describes_every_family_from_headers_only(tiny_checkpoint, capsys, no_tensor_data, family):
    from moe_serve.cli.main import main

    assert main(["info", str(tiny_checkpoint(family))]) == 0
    out = capsys.readouterr().out
    assert "active per token" in out and family.split("_qlora")[0] in out


def test_info_describes_fused_and_bf16_checkpoints(mixtral_dir, tmp_path, capsys, no_tensor_data):
    from moe_serve.cli.main import main

    fused = rewrite_tensors(mixtral_dir, tmp_path / "fused", fuse_experts)
    bf16 = rewrite_tensors(mixtral_dir, tmp_path / "bf16", lambda sd: sd.update({k: v.bfloat16() for k, v in sd.items()}))
    assert main(["info", str(fused)]) == 0 and main(["info", str(bf16)]) == 0
    assert "BF16 (100%)" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="tensor data was read"):  # the fixture does catch a read
        load_model(fused)
