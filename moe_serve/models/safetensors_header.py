"""Why a safetensors file's header is inconsistent, naming the tensor: for the error of a file that
`safe_open` refuses. safetensors says only "invalid shape, data type, or offset for tensor" for a
tensor whose byte span does not fit its shape and dtype, naming none; with hundreds of tensors in a
shard that leaves the reader to guess. Run only after `safe_open` failed: it re-reads the header.

Layout (safetensors' format): 8 bytes little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [start, end]}, "__metadata__": {...}}, then the data;
offsets count from the start of the data, and the tensors cover it without gaps or overlaps.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

# bytes per element of safetensors' dtype names (the sub-byte F4/F6 types are left to safetensors)
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
               "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1,
               "F8_E5M2FNUZ": 1, "F8_E8M0": 1, "C64": 8}
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the header's size


def _read_header(path: Path) -> tuple[dict, int] | str:
    """(header JSON, data bytes after it), or why it cannot be read."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"the file holds {size} bytes, fewer than the 8 of the header length"
        n = struct.unpack("<Q", head)[0]
        if n > MAX_HEADER or 8 + n > size:
            return f"the header length field says {n} bytes, the file holds {size} bytes in all"
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            return f"the header is not valid JSON: {e}"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    return header, size - 8 - n


def _tensor_problem(info, data_bytes: int) -> str | None:
    """What is wrong with one tensor's entry, or None."""
    if not isinstance(info, dict):
        return "its entry is not an object"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        return f"shape {shape!r} is not a list of sizes"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        return f"data_offsets {offsets!r} are not [start, end]"
    start, end = offsets
    if not 0 <= start <= end:
        return f"data_offsets [{start}, {end}] do not run forward"
    if end > data_bytes:
        return f"data_offsets [{start}, {end}] run past the end of the data ({data_bytes} bytes after the header)"
    if dtype not in DTYPE_BYTES:
        return None  # safetensors names an unknown dtype itself
    want = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - start != want:
        return (f"dtype {dtype} and shape {shape} make {want} bytes, but data_offsets [{start}, {end}] "
                f"span {end - start}")
    return None


def header_problem(path: str | Path) -> str | None:
    """What makes `path`'s header inconsistent (naming the tensor), or None when nothing is found."""
    read = _read_header(Path(path))
    if isinstance(read, str):
        return read
    header, data_bytes = read
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        problem = _tensor_problem(info, data_bytes)
        if problem is not None:
            return f"tensor {name!r}: {problem}"
        spans.append((info["data_offsets"][0], info["data_offsets"][1], name))
    spans.sort()
    for (_, end_a, a), (start, end, b) in zip(spans, spans[1:]):  # overlaps first: they also leave gaps
        if start < end_a:
            return f"tensor {b!r}: data_offsets [{start}, {end}] overlap tensor {a!r} (which ends at {end_a})"
    at = 0
    for start, end, name in spans:
        if start != at:
            return f"tensor {name!r}: data_offsets [{start}, {end}] leave {start - at} bytes unused before it"
        at = end
    if at != data_bytes:
        return f"the tensors end at byte {at} of the data, which holds {data_bytes}"
    return None
