"""Reading a Hugging Face checkpoint directory: config.json and (sharded) safetensors, memory-mapped.

Every failure names the file or tensor and what was expected: a missing directory or config.json,
a missing, truncated or corrupt safetensors file (a header whose offsets do not fit a tensor's shape and
dtype names it: safetensors_header.py), a missing tensor key, a tensor of the wrong shape or
dtype. With model.safetensors.index.json, its files are read and no others, and a tensor is read from
the file it names (a copy elsewhere is not used); shard names must be files of the directory.
`check` judges a tensor from the file's header alone (name, shape, dtype), reading no data.
"""
from __future__ import annotations

import json
import os
import weakref
from pathlib import Path

import torch
from safetensors import safe_open

from moe_serve.models.safetensors_header import header_problem

# safetensors' header dtype names -> torch dtypes (those this torch has); only floating types of >= 2 bytes load
_TORCH_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"),
    ("U8", "uint8"), ("BOOL", "bool"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2", "float8_e5m2"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("F8_E8M0", "float8_e8m0fnu"),
    ("C64", "complex64")) if hasattr(torch, attr)}


class CheckpointError(ValueError):
    """The checkpoint directory is missing something or holds something malformed."""


def read_config(model_dir: str | Path) -> dict:
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"model directory {str(d)!r} does not exist or is not a directory")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} is missing: a checkpoint directory needs config.json")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError (which would not name the file)
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object")
    return cfg


class SafetensorsCheckpoint:
    """key -> tensor over one or several safetensors files (memory-mapped, read on demand)."""

    def __init__(self, model_dir: str | Path):
        d = Path(model_dir)
        index = d / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:  # ValueError: bad JSON or bad UTF-8
                raise CheckpointError(f"{index} is malformed (needs a 'weight_map' object): {e}") from None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{index} is malformed: 'weight_map' must map tensor names to file names")
            for k, f in weight_map.items():  # a shard is a file of this directory, as the Hub's are
                if Path(f).is_absolute() or ".." in Path(f).parts:
                    raise CheckpointError(f"{index} is malformed: tensor {k!r} is mapped to {f!r}, which is not a "
                                          f"file name inside {d}")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in d.glob("*.safetensors"))
            weight_map = None
            if not files:
                raise CheckpointError(f"no *.safetensors file in {d} (and no model.safetensors.index.json)")
        self.handles = {}
        self.mapped: dict[str, tuple[int, int, int]] = {}  # file -> (fd, size, mtime_ns) of what safe_open maps
        for name in files:
            path = d / name
            if not path.is_file():
                what = "not a file" if path.exists() else "missing"
                raise CheckpointError(f"{path} is {what} (listed in {index.name})")
            # an fd on the mapped file, for check_unchanged: fstat sees that inode even after a rename over the path
            fd = os.open(path, os.O_RDONLY)
            weakref.finalize(self, os.close, fd)
            st = os.fstat(fd)
            self.mapped[name] = (fd, st.st_size, st.st_mtime_ns)
            try:
                self.handles[name] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for bad headers
                # its message names no tensor for a span that does not fit the shape and dtype
                problem = header_problem(path)
                raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                                      f"{problem or e}") from None
        self.key_file: dict[str, str] = {}
        for name, h in self.handles.items():
            for k in h.keys():
                if weight_map is not None and k in weight_map:
                    if weight_map[k] == name:  # a copy in another file is not read: the index says which is meant
                        self.key_file[k] = name
                    continue
                # nothing says which copy is meant: the last file read would win silently
                if k in self.key_file:
                    why = (f"and {index.name} does not say" if weight_map is not None
                           else "and no model.safetensors.index.json says")
                    raise CheckpointError(f"tensor {k!r} is in both {self.key_file[k]} and {name} in {d} ({why} "
                                          "which to use); remove the stray file")
                self.key_file[k] = name
        if weight_map is not None:
            for k, f in weight_map.items():
                if self.key_file.get(k) != f:
                    raise CheckpointError(f"tensor {k!r} is listed in {index.name} under {f} but {f} lacks it")
        self.dir = d

    def __contains__(self, key: str) -> bool:
        return key in self.key_file

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """The stored dtype as the header names it ("F32", "BF16", "I8", "F8_E4M3", ...)."""
        return self._handle(key).get_slice(key).get_dtype()

    def _file(self, key: str) -> str:
        if key not in self.key_file:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint in {self.dir}")
        return self.key_file[key]

    def _handle(self, key: str):
        return self.handles[self._file(key)]

    def check(self, key: str, shape: tuple[int, ...] | None = None) -> None:
        """Raise what `get` would about `key` (missing, not `shape`, not a float32/bfloat16/float16-like
        dtype) from the header alone: no tensor data is read."""
        self._handle(key)
        if shape is not None and self.shape(key) != tuple(shape):
            raise CheckpointError(f"tensor {key!r} has shape {list(self.shape(key))}, expected {list(shape)} "
                                  f"(in {self.dir / self._file(key)})")
        name = self.dtype(key)
        dt = _TORCH_DTYPES.get(name)
        if dt is None or not dt.is_floating_point or dt.itemsize < 2:
            raise CheckpointError(f"tensor {key!r} has dtype {dt or name}; only float32/bfloat16/float16 weights "
                                  f"are supported (quantized checkpoints are not) (in {self.dir / self._file(key)})")

    def check_unchanged(self, key: str) -> None:
        """Raise CheckpointError if the file holding `key` was truncated or rewritten since it was
        memory-mapped: a read of the mapping past the file's new end kills the process with SIGBUS,
        and a rewrite serves other weights than those loaded. One fstat (microseconds), for callers
        to run right before they read the mapping (host=mmap expert copies). It narrows the window,
        it cannot close it: a truncation between this check and the read still raises SIGBUS.
        A file replaced by a rename passes: the mapping keeps the old inode, unchanged."""
        self.check_file_unchanged(self._file(key))

    def check_file_unchanged(self, name: str) -> None:
        """`check_unchanged` for file `name` of the checkpoint (a key of `mapped`)."""
        fd, size, mtime_ns = self.mapped[name]
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            how = "truncated or extended" if st.st_size != size else "rewritten in place (same size, new mtime)"
            raise CheckpointError(f"{self.dir / name} changed after it was memory-mapped ({how}): {st.st_size} bytes "
                                  f"now, {size} bytes when loaded; its tensors are not read (restart on an unchanged "
                                  "checkpoint)")

    def get(self, key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor (checked against `shape` when given), as stored (mmap-backed, checkpoint dtype)."""
        self.check(key, shape)
        try:
            return self._handle(key).get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {key!r} from {self.dir / self.key_file[key]} "
                                  f"(truncated or corrupt?): {e}") from None
