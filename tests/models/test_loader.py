"""Loading: sharded and fused-expert layouts, dtypes, and clear errors on bad input."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_serve.models import CheckpointError, ForwardBatch, UnsupportedModelError, load_model
from tests.models.tiny_checkpoints import build_hf_model

IDS = list(range(3, 15))


def logits(model):
    model.allocate_kv_cache(1, 32)
    return model(ForwardBatch.single(IDS))


@pytest.fixture(scope="module")
def mixtral_dir(tiny_checkpoint):
    return tiny_checkpoint("mixtral")


def copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


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


def edit_config(src, tmp_path, **changes):
    """A copy of checkpoint `src` whose config.json has `changes` applied."""
    d = copy(src, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


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


def rewrite_tensors(src, tmp_path, edit):
    """A copy of single-file checkpoint `src` whose tensors `edit(state_dict)` changed in place."""
    d = copy(src, tmp_path)
    sd = load_file(d / "model.safetensors")
    edit(sd)
    save_file(sd, d / "model.safetensors")
    return d


def _fuse_experts(sd, layers=(0, 1, 2), num_experts=8):
    for layer in layers:
        p = f"model.layers.{layer}.block_sparse_moe.experts"
        gu = [torch.cat((sd.pop(f"{p}.{e}.w1.weight"), sd.pop(f"{p}.{e}.w3.weight"))) for e in range(num_experts)]
        sd[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(gu)
        sd[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [sd.pop(f"{p}.{e}.w2.weight") for e in range(num_experts)])


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
        _fuse_experts(sd)
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

    fused = rewrite_tensors(mixtral_dir, tmp_path / "fused", _fuse_experts)
    bf16 = rewrite_tensors(mixtral_dir, tmp_path / "bf16", lambda sd: sd.update({k: v.bfloat16() for k, v in sd.items()}))
    assert main(["info", str(fused)]) == 0 and main(["info", str(bf16)]) == 0
    assert "BF16 (100%)" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="tensor data was read"):  # the fixture does catch a read
        load_model(fused)
