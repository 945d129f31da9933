"""load_model: a Hugging Face MoE checkpoint directory -> a ready MoEModel.

    load_model(model_dir, dtype="auto", device="cpu", hooks=NO_HOOKS, expert_store_factory=None, mla_decode="absorbed",
               check_experts=True)

`dtype`: "auto" (the checkpoint's `dtype`/`torch_dtype`, float32 when absent), "float32", "bfloat16",
"float16" or a torch.dtype. Non-expert weights are read (memory-mapped) and copied into the model built
on the meta device (never left backed by the mapping); expert weights go through
`expert_store_factory(spec, source, dtype, device)`, where
`source.get(moe_layer, e) -> (gate_up [2I, H], down [H, I])` reads one expert from the checkpoint
(per-expert keys as published, or transformers 5's fused `experts.gate_up_proj` / `down_proj`).
The default factory builds a ResidentExpertStore. A factory that takes its experts from elsewhere
(not from `source`) passes `check_experts=False`: the checkpoint then need not hold any expert tensor.

What loading accepts is decided before any weight is read, from config.json and the safetensors
headers, by `read_spec` (config.json: family, sizes, a servable dtype, no quantization_config) and `check_tensors`
(every tensor the model and its experts read: present, of the expected shape and a float dtype; tensors
it does not read are named in a logged warning, `warn_unused`);
`moe-serve info` calls the same two, so it refuses what loading refuses, with the same messages.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from itertools import chain
from pathlib import Path
from typing import Iterator

import torch

from moe_serve.config import MLA_DECODE_MODES
from moe_serve.experts.store import resident_store_factory
from moe_serve.models.checkpoint import CheckpointError, SafetensorsCheckpoint, read_config
from moe_serve.models.families import parse_spec
from moe_serve.models.families.common import Family
from moe_serve.models.hooks import NO_HOOKS, HookChain, RouterHooks
from moe_serve.models.model import MoEModel
from moe_serve.models.spec import ModelSpec, UnsupportedModelError

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FP32_PARAMS = ("e_score_correction_bias",)  # transformers keeps these in fp32 whatever the dtype


def resolve_dtype(dtype, spec: ModelSpec) -> torch.dtype:
    if isinstance(dtype, str) and dtype == "auto":  # the checkpoint's: read_spec refused one not in DTYPES
        return DTYPES[spec.torch_dtype]
    # a torch.dtype too: float64 or int8 were taken as given (a float64 model, integer weights)
    if dtype in DTYPES.values():
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)} (or their torch dtypes), got {dtype!r}")
    return DTYPES[dtype]


def resolve_device(device) -> torch.device:
    """`device` as a torch.device, refused up front (ValueError naming it) when torch cannot place tensors
    there: torch's own errors were a RuntimeError for a string naming no device type and an AssertionError
    ('Torch not compiled with CUDA enabled') at the first copy, after the checkpoint had been checked."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"model.device {device!r} is not a torch device (e.g. cpu, cuda, cuda:0)") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"model.device {device!r}: no CUDA device is available (torch.cuda.is_available() "
                             "is false); use cpu")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"model.device {device!r}: there are {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    return dev


class CheckpointExperts:
    """ExpertSource over the checkpoint: one expert's (gate_up [2I, H], down [H, I]) on demand."""

    def __init__(self, ckpt: SafetensorsCheckpoint, family: Family, spec: ModelSpec):
        self.ckpt, self.family, self.spec = ckpt, family, spec
        self.num_moe_layers, self.num_experts = spec.num_moe_layers, spec.num_experts
        self._fused: dict[int, tuple[str, str] | None] = {}
        self._fused_layer: tuple[int, torch.Tensor, torch.Tensor] | None = None  # last fused layer read
        self._files: dict[tuple[int, int], list[str]] = {}  # (moe layer, expert) -> files holding its tensors

    def _fused_keys(self, layer: int) -> tuple[str, str] | None:
        if layer not in self._fused:
            pairs = self.family.fused_expert_keys(layer)
            for g, d in pairs:  # half a pair was read as the per-expert layout: the error named experts.0.w1
                if (g in self.ckpt) != (d in self.ckpt):
                    have, lack = (g, d) if g in self.ckpt else (d, g)
                    raise CheckpointError(f"tensor {lack!r} is missing from the checkpoint in {self.ckpt.dir}, "
                                          f"while {have!r} is there (the fused expert layout needs both)")
            self._fused[layer] = next(((g, d) for g, d in pairs if g in self.ckpt and d in self.ckpt), None)
        return self._fused[layer]

    def _fused_tensors(self, layer: int) -> list[tuple[str, tuple[int, ...]]] | None:
        """(key, shape) of the layer's fused gate_up [E, 2I, H] and down [E, H, I], or None: per-expert keys."""
        fused, s = self._fused_keys(layer), self.spec
        if fused is None:
            return None
        h, i = s.hidden_size, s.moe_intermediate_size
        return [(fused[0], (s.num_experts, 2 * i, h)), (fused[1], (s.num_experts, h, i))]

    def _expert_tensors(self, layer: int, e: int) -> list[tuple[str, tuple[int, ...]]]:
        """(key, shape) of one expert's gate [I, H], up [I, H] and down [H, I]."""
        h, i = self.spec.hidden_size, self.spec.moe_intermediate_size
        return list(zip(self.family.expert_keys(layer, e), ((i, h), (i, h), (h, i))))

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(key, shape) of every expert tensor `get` reads, over all MoE layers."""
        for layer in self.spec.moe_layers:
            fused = self._fused_tensors(layer)
            if fused is not None:
                yield from fused
            else:
                for e in range(self.num_experts):
                    yield from self._expert_tensors(layer, e)

    def check_unchanged(self, moe_layer: int, e: int) -> None:
        """Raise CheckpointError if a file holding expert (moe_layer, e) changed since it was mapped
        (see SafetensorsCheckpoint.check_unchanged): `get` runs it, and a store that reads the returned
        tensors later (an expert copy queued on another thread) runs it again right before."""
        files = self._files.get((moe_layer, e))
        if files is None:  # one fstat per file, not per tensor (an expert's tensors are mostly in one file)
            layer = self.spec.moe_layers[moe_layer]
            keys = self._fused_keys(layer) or self.family.expert_keys(layer, e)
            files = self._files[moe_layer, e] = sorted({self.ckpt.key_file[k] for k in keys})
        for name in files:
            self.ckpt.check_file_unchanged(name)

    def get(self, moe_layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= moe_layer < self.num_moe_layers or not 0 <= e < self.num_experts:
            raise IndexError(f"expert ({moe_layer}, {e}) out of range ({self.num_moe_layers} MoE layers, "
                             f"{self.num_experts} experts)")
        self.check_unchanged(moe_layer, e)  # before safetensors reads the mapping (SIGBUS past a truncated end)
        layer = self.spec.moe_layers[moe_layer]
        fused = self._fused_tensors(layer)
        if fused is not None:  # read the layer's [E, ...] tensors once, not once per expert
            if self._fused_layer is None or self._fused_layer[0] != layer:
                self._fused_layer = (layer, *(self.ckpt.get(key, shape) for key, shape in fused))
            return self._fused_layer[1][e], self._fused_layer[2][e]
        gate, up, down = (self.ckpt.get(key, shape) for key, shape in self._expert_tensors(layer, e))
        return torch.cat((gate, up), dim=0), down


def refuse_quantized(cfg: dict) -> None:
    quant = cfg.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise UnsupportedModelError(f"quantized checkpoints are not supported (config.json quantization_config."
                                    f"quant_method={method!r}); use a float32/bfloat16/float16 checkpoint")


def read_spec(model_dir: str | Path) -> tuple[dict, Family, ModelSpec]:
    """config.json -> (config, family, spec), refusing what load_model cannot load (the field named)."""
    cfg = read_config(model_dir)
    family, spec = parse_spec(cfg)
    refuse_quantized(cfg)
    return cfg, family, spec


def dense_tensors(model: MoEModel, family: Family) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """(runtime name, checkpoint key, shape) of every non-expert parameter and buffer of `model`."""
    for name, t in chain(model.named_parameters(), model.named_buffers()):
        yield name, family.checkpoint_key(name), tuple(t.shape)


def untie_saved_head(ckpt: SafetensorsCheckpoint, family: Family, spec: ModelSpec) -> ModelSpec:
    """`spec` untied when config.json ties lm_head to the embeddings yet the checkpoint holds an
    lm_head.weight of other values: transformers (5) then keeps the saved head (with a warning), so
    the embeddings would compute other logits. An equal saved head changes nothing (stays tied).
    Reads the two tensors' values, only in that case."""
    head, embed = family.checkpoint_key("lm_head.weight"), family.checkpoint_key("embed_tokens.weight")
    if not spec.tie_word_embeddings or head not in ckpt or embed not in ckpt:
        return spec
    if ckpt.shape(head) == ckpt.shape(embed) and torch.equal(ckpt.get(head), ckpt.get(embed)):
        return spec
    return dataclasses.replace(spec, tie_word_embeddings=False)


def check_tensors(model_dir: str | Path, family: Family, spec: ModelSpec,
                  experts: bool = True) -> tuple[SafetensorsCheckpoint, MoEModel, CheckpointExperts]:
    """Open the checkpoint and check every tensor load_model reads (present, expected shape, a float dtype
    of >= 2 bytes) from the safetensors headers alone (but a tied head saved anyway: untie_saved_head);
    raises CheckpointError naming the first bad one.
    `experts=False` leaves the expert tensors unchecked (a store that does not read them from the checkpoint).
    Returns the checkpoint, the model built on the meta device and the experts' source."""
    ckpt = SafetensorsCheckpoint(model_dir)
    spec = untie_saved_head(ckpt, family, spec)
    with torch.device("meta"):
        model = MoEModel(spec)
    for name, key, shape in dense_tensors(model, family):
        if name == "lm_head.weight" and key not in ckpt:
            raise CheckpointError(f"tensor 'lm_head.weight' is missing and tie_word_embeddings is false "
                                  f"in {Path(model_dir) / 'config.json'}")
        ckpt.check(key, shape)
    source = CheckpointExperts(ckpt, family, spec)
    if experts:
        for key, shape in source.tensors():
            ckpt.check(key, shape)
        warn_unused(ckpt, {key for _, key, _ in dense_tensors(model, family)} | {k for k, _ in source.tensors()}, spec)
    return ckpt, model, source


def unused_tensors(ckpt: SafetensorsCheckpoint, read: set[str], spec: ModelSpec) -> list[str]:
    """The checkpoint's tensors that loading does not read, but those transformers also skips without a
    word: rotary inv_freq buffers (older checkpoints saved them; they are recomputed), DeepSeek-V3's
    multi-token-prediction layers (model.layers.{num_hidden_layers + i}, i < num_nextn_predict_layers,
    which the published V3/R1 checkpoints hold and inference does not use), a tied head saved as well."""
    mtp = {str(spec.num_layers + i) for i in range(spec.extra.get("num_nextn_predict_layers") or 0)}

    def skipped(key: str) -> bool:
        layer = re.match(r"model\.layers\.(\d+)\.", key)
        return (key.endswith("rotary_emb.inv_freq") or (layer is not None and layer.group(1) in mtp)
                or (key == "lm_head.weight" and spec.tie_word_embeddings))
    return sorted(k for k in ckpt.key_file if k not in read and not skipped(k))


def warn_unused(ckpt: SafetensorsCheckpoint, read: set[str], spec: ModelSpec, shown: int = 5) -> None:
    """Log a warning naming the tensors loading does not read (and their files): a config.json that
    describes less than the checkpoint holds (fewer layers, no shared expert) loads without them, as
    transformers loads it with a warning; published checkpoints hold such tensors, so not an error."""
    unused = unused_tensors(ckpt, read, spec)
    if unused:
        names = ", ".join(f"{k!r} (in {ckpt.key_file[k]})" for k in unused[:shown])
        more = f" and {len(unused) - shown} more" if len(unused) > shown else ""
        log.warning("%d tensor(s) of the checkpoint in %s are not used by the model config.json describes (%d "
                    "layers, %s); they are ignored, check config.json if they were meant to be: %s%s",
                    len(unused), ckpt.dir, spec.num_layers, spec.architecture, names, more)


def load_model(model_dir: str | Path, dtype="auto", device="cpu", hooks: RouterHooks = NO_HOOKS,
               expert_store_factory=None, mla_decode: str = "absorbed", check_experts: bool = True) -> MoEModel:
    if mla_decode not in MLA_DECODE_MODES:
        raise ValueError(f"model.mla_decode must be one of {', '.join(MLA_DECODE_MODES)}, got {mla_decode!r}")
    device = resolve_device(device)
    cfg, family, spec = read_spec(model_dir)
    dt = resolve_dtype(dtype, spec)
    ckpt, model, source = check_tensors(model_dir, family, spec, experts=check_experts)  # before any weight is read
    model.hooks = hooks
    state = {}
    for name, key, shape in dense_tensors(model, family):
        target = torch.float32 if name.endswith(FP32_PARAMS) else dt
        stored = ckpt.get(key, shape)  # a view of the checkpoint's mapping
        t = stored.to(device=device, dtype=target).contiguous()
        # on a CPU in the checkpoint's dtype that is still the mapping: a file truncated after loading then killed
        # the process with SIGBUS in the next step's dense layers (expert reads are checked first). So copy: the
        # dense weights are small next to the experts (default model 3.3 of 15.3 MiB, Mixtral-8x7B about 3.5%)
        if t.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr():
            t = t.clone()
        state[name] = t
    model.load_state_dict(state, assign=True, strict=True)
    model.store = (expert_store_factory or resident_store_factory)(spec, source, dt, device)
    routing_hook = getattr(model.store, "routing_hook", None)
    if routing_hook is not None:  # the store's predictor reads each router's choice, after any replay in `hooks`
        model.hooks = HookChain([hooks, routing_hook])
    model.family, model.config, model.model_dir = family.name, cfg, str(model_dir)
    for layer in model.layers:
        if hasattr(layer.self_attn, "absorb_decode"):  # MLA
            layer.self_attn.absorb_decode = mla_decode == "absorbed"
    return model.finish_loading().eval()
