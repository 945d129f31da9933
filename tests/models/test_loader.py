"""Loading: sharded and fused-expert layouts, dtypes, and clear errors on bad tensors and files
(config.json's checks: test_loader_config.py; `moe-serve info` against the loader: test_info_vs_loader.py)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_serve.models import CheckpointError, ForwardBatch, UnsupportedModelError, load_model
from tests.models.checkpoint_edits import copy, rewrite_tensors
from tests.models.tiny_checkpoints import build_hf_model

IDS = list(range(3, 15))


def logits(model):
    model.allocate_kv_cache(1, 32)
    return model(ForwardBatch.single(IDS))


def test_sharded_checkpoint_equals_single(mixtral_dir, tmp_path):
    sharded = tmp_path / "sharded"
    build_hf_model("mixtral").save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 1
    torch.testing.assert_close(logits(load_model(sharded)), logits(load_model(mixtral_dir)), rtol=0, atol=0)


def test_fused_expert_layout_equals_per_expert(mixtral_dir, tmp_path):
    d = copy(mixtral_dir, tmp_path)
    sd = load_file(d / "model.safetensors")
    spec = load_model(mixtral_dir).spec
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}.block_sparse_moe.experts"
        gu = [torch.cat((sd.pop(f"{p}.{e}.w1.weight"), sd.pop(f"{p}.{e}.w3.weight"))) for e in range(spec.num_experts)]
        dn = [sd.pop(f"{p}.{e}.w2.weight") for e in range(spec.num_experts)]
        sd[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(gu)  # [E, 2I, H]
        sd[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(dn)  # [E, H, I]
    save_file(sd, d / "model.safetensors")
    torch.testing.assert_close(logits(load_model(d)), logits(load_model(mixtral_dir)), rtol=0, atol=0)


def test_bf16_checkpoint_loads_in_its_dtype(tmp_path):
    d = tmp_path / "bf16"
    build_hf_model("qwen2_moe", dtype=torch.bfloat16).save_pretrained(d)
    m = load_model(d)
    assert m.dtype == torch.bfloat16 and m.store.gate_up[0].dtype == torch.bfloat16
    assert m.kv_bytes_per_token() == 2 * m.spec.num_layers * m.spec.num_kv_heads * m.spec.head_dim * 2
    out = logits(m)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert load_model(d, dtype="float32").dtype == torch.float32


def test_spec_fields(tiny_checkpoint):
    s = load_model(tiny_checkpoint("deepseek_v3")).spec
    assert (s.family, s.attention, s.num_experts, s.top_k, s.moe_layers) == ("deepseek_v3", "mla", 16, 4, (1, 2))
    assert s.routing.topk_method == "noaux_tc" and s.routing.has_bias and s.routing.n_group == 4
    assert s.rope.kind == "yarn" and s.rope.interleaved and s.eos_token_ids == (2,)
    assert s.kv_bytes_per_token(2) == 3 * (32 + 8) * 2
    q = load_model(tiny_checkpoint("qwen2_moe")).spec
    assert q.moe_layers == (0, 2) and q.shared_expert_gate and q.shared_expert_intermediate_size == 80


def test_missing_dir_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)


def test_unknown_architecture_lists_supported(mixtral_dir, tmp_path):
    d = copy(mixtral_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*MixtralForCausalLM.*DeepseekV3ForCausalLM"):
        load_model(d)


def test_truncated_safetensors_names_the_file(mixtral_dir, tmp_path):
    d = copy(mixtral_dir, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(d)


def test_missing_safetensors(mixtral_dir, tmp_path):
    d = copy(mixtral_dir, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(d)


def test_wrong_shape_names_key_expected_and_got(mixtral_dir, tmp_path):
    d = copy(mixtral_dir, tmp_path)
    sd = load_file(d / "model.safetensors")
    sd["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(60, 64)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"q_proj.weight.*\[60, 64\].*expected \[64, 64\]"):
        load_model(d)


def test_missing_expert_key(mixtral_dir, tmp_path):
    d = copy(mixtral_dir, tmp_path)
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.2.block_sparse_moe.experts.5.w3.weight"]
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="experts.5.w3.weight.*missing"):
        load_model(d)


def test_store_with_its_own_experts_loads_a_checkpoint_without_experts(mixtral_dir, tmp_path):
    # benches/expert_offload_gpu.py: the experts live in host memory, the checkpoint holds the rest only
    full = load_model(mixtral_dir)
    d = rewrite_tensors(mixtral_dir, tmp_path, lambda sd: [sd.pop(k) for k in list(sd) if ".experts." in k])
    with pytest.raises(CheckpointError, match="experts.0.w1.weight.*missing"):
        load_model(d)  # the default store reads the checkpoint's experts: still refused up front
    from moe_serve.experts.store import ResidentExpertStore

    own = load_model(d, check_experts=False,
                     expert_store_factory=lambda spec, source, dtype, device: ResidentExpertStore(full.store.gate_up,
                                                                                                  full.store.down))
    torch.testing.assert_close(logits(own), logits(full), rtol=0, atol=0)


def test_bad_dtype(mixtral_dir):
    with pytest.raises(ValueError, match="dtype"):
        load_model(mixtral_dir, dtype="int8")


def test_tied_embeddings_match_transformers(tmp_path):
    hf = build_hf_model("qwen3_moe", tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    m = load_model(tmp_path)
    assert m.spec.tie_word_embeddings and not hasattr(m, "lm_head")
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0, -1]
    torch.testing.assert_close(logits(m)[0], ref, rtol=1e-4, atol=1e-4)


def test_quantized_checkpoint_refused(mixtral_dir, tmp_path):
    d = copy(mixtral_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="quant_method='fp8'"):
        load_model(d)


def test_unindexed_files_holding_one_key_twice_are_refused(mixtral_dir, tmp_path):
    """Without an index every *.safetensors file is read; a stray file repeating a key used to replace
    the tensor silently (the last file in name order won): here a zero final norm."""
    d = copy(mixtral_dir, tmp_path)
    save_file({"model.norm.weight": torch.zeros(64)}, d / "zz-stray.safetensors")
    with pytest.raises(CheckpointError, match="'model.norm.weight' is in both model.safetensors and zz-stray.safetensors"):
        load_model(d)


@pytest.mark.parametrize("weight_map", [[], {"model.norm.weight": 5}])
def test_malformed_index_weight_map_names_the_index(tmp_path, weight_map):
    """A list or a non-string file name raised a bare AttributeError / TypeError (a traceback from `info`)."""
    d = tmp_path / "sharded"
    build_hf_model("mixtral").save_pretrained(d, max_shard_size="100KB")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json is malformed"):
        load_model(d)
