"""Bad checkpoints refused up front, by `load_model` and `moe-serve info` alike, with the field or key named.

(test_loader.py holds the first such cases; this file continues them: config.json's dtype, sharded
checkpoints whose index disagrees with the files, tensors and config fields out of range.)
"""
from __future__ import annotations

import pytest
import torch

from moe_serve.cli.main import main
from moe_serve.models import UnsupportedModelError, load_model
from tests.models.test_loader import edit_config


@pytest.fixture(scope="module")
def mixtral_dir(tiny_checkpoint):
    return tiny_checkpoint("mixtral")


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
