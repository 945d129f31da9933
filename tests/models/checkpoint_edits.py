"""Copies of a tiny checkpoint with one thing changed (config.json fields, tensors), for the loader's tests."""
from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file, save_file


def copy(src, tmp_path):
    """A copy of checkpoint dir `src` at tmp_path/ckpt."""
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def edit_config(src, tmp_path, **changes):
    """A copy of checkpoint `src` whose config.json has `changes` applied."""
    d = copy(src, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def rewrite_tensors(src, tmp_path, edit):
    """A copy of single-file checkpoint `src` whose tensors `edit(state_dict)` changed in place."""
    d = copy(src, tmp_path)
    sd = load_file(d / "model.safetensors")
    edit(sd)
    save_file(sd, d / "model.safetensors")
    return d


def fuse_experts(sd, layers=(0, 1, 2), num_experts=8):
    """Replace a tiny Mixtral state dict's per-expert w1/w3/w2 of `layers` by the fused gate_up_proj/down_proj."""
    for layer in layers:
        p = f"model.layers.{layer}.block_sparse_moe.experts"
        gu = [torch.cat((sd.pop(f"{p}.{e}.w1.weight"), sd.pop(f"{p}.{e}.w3.weight"))) for e in range(num_experts)]
        sd[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(gu)
        sd[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [sd.pop(f"{p}.{e}.w2.weight") for e in range(num_experts)])
