"""The supported families, looked up by config.json's `architectures` or `model_type`."""
from __future__ import annotations

from moe_serve.models.families import deepseek, mixtral, olmoe, qwen_moe
from moe_serve.models.families.common import Family
from moe_serve.models.spec import ModelSpec, UnsupportedModelError

FAMILIES: tuple[Family, ...] = (mixtral.FAMILY, qwen_moe.QWEN2_MOE, qwen_moe.QWEN3_MOE, olmoe.FAMILY,
                                deepseek.DEEPSEEK_V2, deepseek.DEEPSEEK_V3)


def supported() -> list[str]:
    return [a for f in FAMILIES for a in f.architectures]


def family_of(cfg: dict) -> Family:
    """The family of a parsed config.json; an unknown one raises naming what is supported."""
    archs = cfg.get("architectures") or []
    if isinstance(archs, str):  # one name where transformers writes a list of them: not its letters
        archs = [archs]
    if not isinstance(archs, list):
        raise ValueError(f"config.json field 'architectures' must be a list of class names, got {archs!r}")
    for fam in FAMILIES:
        if any(a in fam.architectures for a in archs):
            return fam
    mt = cfg.get("model_type")
    for fam in FAMILIES:
        if mt in fam.model_types:
            return fam
    raise UnsupportedModelError(
        f"unsupported architecture {archs or None} (model_type {mt!r}); supported architectures: "
        f"{', '.join(supported())}")


def parse_spec(cfg: dict) -> tuple[Family, ModelSpec]:
    fam = family_of(cfg)
    spec = fam.parse(cfg)
    if not spec.moe_layers:  # nothing for the expert store to hold: it would fail without naming the config
        raise UnsupportedModelError(
            f"config.json makes none of the {spec.num_layers} layers of this {spec.architecture} an MoE layer "
            "(see first_k_dense_replace, moe_layer_freq, mlp_only_layers, decoder_sparse_step); a dense model "
            "is not supported")
    return fam, spec
