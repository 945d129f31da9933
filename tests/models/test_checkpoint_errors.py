"""Bad checkpoints refused up front, by `load_model` and `moe-serve info` alike, with the field or key named.

(test_loader.py and test_loader_config.py hold the first such cases; this file continues them:
config.json's dtype, sharded checkpoints whose index disagrees with the files, tensors and config
fields out of range.)
"""
from __future__ import annotations

import re

import pytest
import torch

from moe_serve.cli.main import main
from moe_serve.models import UnsupportedModelError, load_model
from tests.models.checkpoint_edits import edit_config


@pytest.mark.parametrize("field, value", [("dtype", "float64"), ("torch_dtype", "float64"), ("dtype", "int8"),
                                          ("torch_dtype", "float8_e4m3fn"), ("dtype", "floa32")])
def test_unservable_config_dtype_is_refused_whatever_dtype_is_asked(mixtral_dir, tmp_path, capsys, field, value):
    """`info` described a float64 checkpoint and exited 0, and load_model refused it only under dtype=auto:
    whether a checkpoint is refused depended on the caller's flag. Now config.json's field is checked with
    the rest of config.json, so info, dtype=auto and an explicit dtype all refuse it, naming the field."""
    d = edit_config(mixtral_dir, tmp_path, **{"dtype": None, "torch_dtype": None, field: value})
    message = f"config.json field '{field}' must be one of float32, bfloat16, float16, got {value!r}"
    for dtype in ("auto", "float32", torch.bfloat16):
        with pytest.raises(UnsupportedModelError) as err:
            load_model(d, dtype=dtype)
        assert message in str(err.value)
    assert main(["info", str(d)]) == 2
    assert capsys.readouterr().err.strip() == f"moe-serve info: error: {err.value}"


@pytest.mark.parametrize("value", ["float32", "torch.bfloat16", "float16", None])
def test_servable_config_dtypes_load(mixtral_dir, tmp_path, value):
    d = edit_config(mixtral_dir, tmp_path, dtype=None, torch_dtype=value)
    want = {None: "float32"}.get(value, str(value).replace("torch.", ""))
    assert load_model(d).dtype == getattr(torch, want)


def shard(src, dst, groups: dict[str, list[str]], index: dict[str, str] | None = None):
    """Checkpoint `src` (one model.safetensors) split into the files of `groups` (file name -> keys) in `dst`,
    with an index mapping every key to the first file holding it (or `index`, as given)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    sd = load_file(src / "model.safetensors")
    weight_map = {}
    for name, keys in groups.items():
        save_file({k: sd[k] for k in keys}, dst / name, metadata={"format": "pt"})
        for k in keys:
            weight_map.setdefault(k, name)
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index or weight_map}))
    return dst


def _halves(src):
    from safetensors import safe_open

    with safe_open(str(src / "model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    return {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}


def test_a_key_in_two_shards_is_read_from_the_one_the_index_names(mixtral_dir, tmp_path):
    """The index said model.norm.weight is in a.safetensors, which holds it, and loading failed with
    "listed ... under a.safetensors but a.safetensors lacks it" because b's copy, read last, had won."""
    from safetensors.torch import load_file, save_file

    key = "model.norm.weight"
    groups = {name: [k for k in keys if k != key] for name, keys in _halves(mixtral_dir).items()}
    groups["a.safetensors"].append(key)
    d = shard(mixtral_dir, tmp_path / "sharded", groups)
    b = load_file(d / "b.safetensors")
    save_file({**b, key: torch.zeros(64)}, d / "b.safetensors", metadata={"format": "pt"})  # a stray, other copy
    model = load_model(d)
    torch.testing.assert_close(model.norm.weight, load_file(mixtral_dir / "model.safetensors")[key])


def test_a_shard_the_index_does_not_name_is_not_read(mixtral_dir, tmp_path):
    """As transformers: the index lists the files; a stray *.safetensors beside them is ignored."""
    from safetensors.torch import load_file, save_file

    d = shard(mixtral_dir, tmp_path / "sharded", _halves(mixtral_dir))
    save_file({"model.norm.weight": torch.zeros(64)}, d / "zz-stray.safetensors")
    key = "model.norm.weight"
    torch.testing.assert_close(load_model(d).norm.weight, load_file(mixtral_dir / "model.safetensors")[key])


@pytest.mark.parametrize("case", ["missing", "directory", "outside", "absolute"])
def test_index_naming_a_shard_that_cannot_be_read(mixtral_dir, tmp_path, capsys, case):
    """A directory was reported as missing; a name leading out of the checkpoint directory (../, an
    absolute path) was opened wherever it pointed."""
    groups = _halves(mixtral_dir)
    d = shard(mixtral_dir, tmp_path / "sharded", groups)
    if case == "missing":
        (d / "b.safetensors").unlink()
        message = f"{d / 'b.safetensors'} is missing (listed in model.safetensors.index.json)"
    elif case == "directory":
        (d / "b.safetensors").unlink()
        (d / "b.safetensors").mkdir()
        message = f"{d / 'b.safetensors'} is not a file (listed in model.safetensors.index.json)"
    else:
        outside = "../sharded/b.safetensors" if case == "outside" else str(d / "b.safetensors")
        index = {**{k: "a.safetensors" for k in groups["a.safetensors"]},
                 **{k: outside for k in groups["b.safetensors"]}}
        shard(mixtral_dir, tmp_path / "other", groups, index=index)
        d = tmp_path / "other"
        message = (f"model.safetensors.index.json is malformed: tensor {groups['b.safetensors'][0]!r} is mapped to "
                   f"{outside!r}, which is not a file name inside {d}")
    with pytest.raises(ValueError) as err:
        load_model(d)
    assert message in str(err.value)
    assert main(["info", str(d)]) == 2 and capsys.readouterr().err.strip() == f"moe-serve info: error: {err.value}"


@pytest.mark.parametrize("kept", ["gate_up_proj", "down_proj"])
def test_half_a_fused_expert_pair_names_the_missing_half(mixtral_dir, tmp_path, capsys, kept):
    """A layer with a fused gate_up_proj but no down_proj (or the reverse) was read as per-expert, and
    the error named 'experts.0.w1.weight', a key of a layout the checkpoint does not use."""
    from tests.models.checkpoint_edits import fuse_experts, rewrite_tensors

    lost = "down_proj" if kept == "gate_up_proj" else "gate_up_proj"

    def edit(sd):
        fuse_experts(sd)
        del sd[f"model.layers.1.mlp.experts.{lost}"]

    d = rewrite_tensors(mixtral_dir, tmp_path, edit)
    message = (f"tensor 'model.layers.1.mlp.experts.{lost}' is missing from the checkpoint in {d}, while "
               f"'model.layers.1.mlp.experts.{kept}' is there (the fused expert layout needs both)")
    with pytest.raises(ValueError) as err:
        load_model(d)
    assert str(err.value) == message
    assert main(["info", str(d)]) == 2 and capsys.readouterr().err.strip() == f"moe-serve info: error: {message}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, "float64", 16])
def test_an_unservable_dtype_argument_is_refused(mixtral_dir, dtype):
    """A torch.dtype was taken as given: float64 loaded a float64 model, int8 cast the weights to integers."""
    with pytest.raises(ValueError, match=re.escape(f"dtype must be auto or one of float32, bfloat16, float16 (or "
                                                   f"their torch dtypes), got {dtype!r}")):
        load_model(mixtral_dir, dtype=dtype)
