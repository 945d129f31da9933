"""Damaged trace archives: every one is a ValueError naming the file (and the member, where one is at fault)."""
import zipfile

import numpy as np
import pytest

from predictors.traces import RoutingTrace, load_trace


def _compressed_trace(path):
    """A valid trace written by np.savez_compressed (a user's own converter may well write one)."""
    experts = np.stack([np.arange(3) + i % 5 for i in range(200)])[:, None, :].repeat(2, 1).astype(np.int16)
    trace = RoutingTrace(experts, np.full(experts.shape, 0.5, np.float16), np.array([0, 120, 200]), 8)
    np.savez_compressed(path, experts=trace.experts, weights=trace.weights, seq_offsets=trace.seq_offsets,
                        meta=np.array('{"num_experts": 8, "top_k": 3}'))
    return path


def _member_data_offset(path, member: str) -> int:
    """Byte offset of `member`'s (compressed) data in the archive."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    raw = path.read_bytes()
    name_len, extra_len = (int.from_bytes(raw[info.header_offset + o:info.header_offset + o + 2], "little")
                           for o in (26, 28))
    return info.header_offset + 30 + name_len + extra_len


def test_a_garbled_compressed_member_names_the_file_and_the_key(tmp_path):
    """A flipped byte inside a compressed member raised zlib.error ('invalid distance too far back', ...),
    a traceback from `moe-serve place`/`cache-sim` and a failed engine start under --replay-trace."""
    path = _compressed_trace(tmp_path / "t.npz")
    assert load_trace(path).num_tokens == 200
    raw = bytearray(path.read_bytes())
    start = _member_data_offset(path, "weights.npy")
    raw[start:start + 8] = b"\xff" * 8  # a broken deflate stream
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"trace {bad}: 'weights': cannot be read \(.*\)"):
        load_trace(bad)


@pytest.mark.parametrize("field, message", [
    (10, r"'experts': cannot be read \(That compression method is not supported\)"),  # compression method
    (6, r"not a readable .npz routing trace \(zip file version"),  # version needed to extract
])
def test_an_unknown_compression_or_zip_version_names_the_file(tmp_path, field, message):
    """A garbled compression-method or version field in the archive's directory: NotImplementedError
    ('That compression method is not supported', 'zip file version 21.0'), a traceback."""
    path = _compressed_trace(tmp_path / "t.npz")
    raw = bytearray(path.read_bytes())
    entry = raw.find(b"PK\x01\x02")  # the central directory's first entry: experts.npy, written first
    assert raw[entry + 46:entry + 57] == b"experts.npy"
    raw[entry + field:entry + field + 2] = (99 if field == 10 else 210).to_bytes(2, "little")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"trace {bad}: {message}"):
        load_trace(bad)


def test_random_damage_is_always_a_value_error_naming_the_file(tmp_path):
    """Bytes of a compressed trace overwritten at random (fixed seed), and the archive cut short at every
    length: load_trace loads it or raises ValueError naming the file, never another exception."""
    path = _compressed_trace(tmp_path / "t.npz")
    data = path.read_bytes()
    bad = tmp_path / "bad.npz"
    rng = np.random.default_rng(0)
    for i in range(300):
        raw = bytearray(data)
        for j in rng.integers(len(raw), size=2):
            raw[j] = int(rng.integers(256))
        bad.write_bytes(bytes(raw) if i % 2 else bytes(raw[:int(rng.integers(len(raw)))]))
        try:
            load_trace(bad)
        except ValueError as e:
            assert str(e).startswith(f"trace {bad}: "), e


def test_a_member_claiming_an_impossible_shape_names_the_file_and_the_key(tmp_path):
    """An .npy header (garbled, or written by hand) claiming 10**13 x 3 x 2 ids: numpy tried to allocate
    109 TiB and the MemoryError was a traceback. Now a ValueError naming the file and the key."""
    import io

    path = _compressed_trace(tmp_path / "t.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    buf = io.BytesIO()
    np.save(buf, arrays["experts"])
    raw = bytearray(buf.getvalue())
    end = raw.index(b"\n") + 1
    header = raw[10:end].decode("latin1")
    claimed = header.replace("(200, 2, 3), }", "(10000000000000, 2, 3), }")
    assert claimed != header
    raw[10:end] = (claimed[:len(header) - 1].rstrip().ljust(len(header) - 1) + "\n").encode("latin1")
    bad = tmp_path / "bad.npz"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("experts.npy", bytes(raw))
        for key in ("weights", "seq_offsets", "meta"):
            member = io.BytesIO()
            np.save(member, arrays[key])
            z.writestr(f"{key}.npy", member.getvalue())
    with pytest.raises(ValueError, match=rf"trace {bad}: 'experts': cannot be read \(.*allocate"):
        load_trace(bad)
