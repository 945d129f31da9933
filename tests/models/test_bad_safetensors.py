"""Safetensors files whose header lies (offsets, shape or dtype that do not fit the bytes), and
tensors the model does not read: refused, or reported, naming the file and the tensor."""
from __future__ import annotations

import json
import struct

import pytest

from moe_serve.cli.main import main
from moe_serve.models import load_model
from moe_serve.models.checkpoint import CheckpointError
from tests.models.checkpoint_edits import copy

KEY = "model.norm.weight"  # 64 float32 values: 256 bytes


def rewrite_header(d, edit):
    """Rewrite the JSON header of d/model.safetensors with `edit(header)`; the data bytes stay as they were."""
    path = d / "model.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return header


def _span(header, key=KEY):
    return header[key]["data_offsets"]


def _shorten(h):
    h[KEY]["data_offsets"][1] -= 4


def _halve_shape(h):
    h[KEY]["shape"] = [32]


def _as_f16(h):
    h[KEY]["dtype"] = "F16"


CASES = {  # name: (header edit, what the error must say after "tensor 'model.norm.weight': ")
    "span shorter than the shape": (_shorten, "dtype F32 and shape [64] make 256 bytes, but data_offsets [{s}, {e4}] "
                                              "span 252"),
    "shape smaller than the span": (_halve_shape, "dtype F32 and shape [32] make 128 bytes, but data_offsets "
                                                  "[{s}, {e}] span 256"),
    "dtype of another size": (_as_f16, "dtype F16 and shape [64] make 128 bytes, but data_offsets [{s}, {e}] "
                                       "span 256"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_header_whose_span_does_not_fit_names_the_tensor(mixtral_dir, tmp_path, capsys, case):
    """safetensors' own message, "invalid shape, data type, or offset for tensor", named no tensor."""
    edit, says = CASES[case]
    d = copy(mixtral_dir, tmp_path)
    s, e = _span(rewrite_header(d, lambda h: None))
    rewrite_header(d, edit)
    with pytest.raises(CheckpointError) as err:
        load_model(d)
    assert str(err.value) == (f"{d / 'model.safetensors'} is not a readable safetensors file (truncated or corrupt?): "
                              f"tensor {KEY!r}: " + says.format(s=s, e=e, e4=e - 4))
    assert main(["info", str(d)]) == 2 and capsys.readouterr().err.strip() == f"moe-serve info: error: {err.value}"


def test_offsets_past_the_data_and_overlapping_name_the_tensor(mixtral_dir, tmp_path):
    d = copy(mixtral_dir, tmp_path)
    header = rewrite_header(d, lambda h: None)
    data = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    s, e = _span(header)
    rewrite_header(d, lambda h: h[KEY].update(data_offsets=[s + data, e + data]))
    with pytest.raises(CheckpointError, match=rf"tensor '{KEY}': data_offsets \[{s + data}, {e + data}\] run past "
                                              rf"the end of the data \({data} bytes after the header\)"):
        load_model(d)
    other = next(k for k, v in header.items() if k not in ("__metadata__", KEY) and v["shape"] == [64])
    d = copy(mixtral_dir, tmp_path / "overlap")
    rewrite_header(d, lambda h: h[other].update(data_offsets=[s, e]))  # two tensors on the same bytes
    first, second = sorted([KEY, other])  # ties in start offset sort by name
    with pytest.raises(CheckpointError, match=rf"tensor '{second}': data_offsets \[{s}, {e}\] overlap tensor "
                                              rf"'{first}' \(which ends at {e}\)"):
        load_model(d)


@pytest.mark.parametrize("bad", ["dtype", "shape"])
def test_a_tensor_of_the_wrong_dtype_or_shape_names_its_shard(mixtral_dir, tmp_path, capsys, bad):
    """The error named the tensor but not the file: in a checkpoint of many shards, which one to fix?"""
    import torch
    from safetensors.torch import load_file, save_file

    d = copy(mixtral_dir, tmp_path)
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    home = next(f for f, ks in shards.items() if KEY in ks)
    sd[KEY] = sd[KEY].to(torch.int8) if bad == "dtype" else sd[KEY][:32]
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, d / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    what = ("has dtype torch.int8; only float32/bfloat16/float16 weights are supported (quantized checkpoints are not)"
            if bad == "dtype" else "has shape [32], expected [64]")
    with pytest.raises(CheckpointError) as err:
        load_model(d)
    assert str(err.value) == f"tensor {KEY!r} {what} (in {d / home})"
    assert main(["info", str(d)]) == 2 and capsys.readouterr().err.strip() == f"moe-serve info: error: {err.value}"


def _add_tensors(d, config=None, **tensors):
    """Checkpoint dir `d` (one model.safetensors) with `tensors` added and config.json updated by `config`."""
    from safetensors.torch import load_file, save_file

    sd = load_file(d / "model.safetensors")
    save_file({**sd, **{k.replace("__", "."): v(sd).clone() for k, v in tensors.items()}}, d / "model.safetensors",
              metadata={"format": "pt"})
    if config:
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **config}))
    return d


def _logits(d):
    from tests.models.helpers import model_logits

    model = load_model(d)
    model.allocate_kv_cache(1, 16)
    return model_logits(model, [5, 9, 3, 7], slot=0)


def test_tensors_the_model_does_not_read_are_named_in_a_warning(mixtral_dir, tmp_path, caplog):
    """A checkpoint holding more than config.json describes (here a fourth layer, and a tensor of no known
    module) loaded without a word. As transformers, it still loads, ignoring them, now with a warning
    naming them and their file."""
    import torch

    d = _add_tensors(copy(mixtral_dir, tmp_path), model__layers__3__self_attn__q_proj__weight=lambda sd: torch.ones(2),
                     model__layers__0__mystery__weight=lambda sd: torch.ones(3))
    with caplog.at_level("WARNING", logger="moe_serve.models.loader"):
        logits = _logits(d)
    assert torch.equal(logits, _logits(mixtral_dir))
    [warning] = [r.getMessage() for r in caplog.records if r.name == "moe_serve.models.loader"]
    assert f"2 tensor(s) of the checkpoint in {d} are not used by the model config.json describes (3 layers, " \
           "MixtralForCausalLM)" in warning
    assert warning.endswith("'model.layers.0.mystery.weight' (in model.safetensors), "
                            "'model.layers.3.self_attn.q_proj.weight' (in model.safetensors)")


def test_tensors_transformers_skips_silently_raise_no_warning(tiny_checkpoint, tmp_path, caplog):
    """DeepSeek-V3's multi-token-prediction layer (the layer after the last, as published V3/R1 checkpoints
    hold it), an old rotary inv_freq buffer, and a tied head saved with the embeddings' values."""
    v3 = tiny_checkpoint("deepseek_v3")
    d = _add_tensors(copy(v3, tmp_path), config={"num_nextn_predict_layers": 1, "tie_word_embeddings": True},
                     model__layers__3__eh_proj__weight=lambda sd: sd["model.layers.1.mlp.gate.weight"],
                     model__layers__0__self_attn__rotary_emb__inv_freq=lambda sd: sd["model.norm.weight"][:4],
                     lm_head__weight=lambda sd: sd["model.embed_tokens.weight"])
    with caplog.at_level("WARNING", logger="moe_serve.models.loader"):
        load_model(d)
    assert [r.getMessage() for r in caplog.records if r.name == "moe_serve.models.loader"] == []
