"""Routing traces: the one data format shared by the runtime, `predictors` and `placement`.

A trace is what the routers chose, per token and MoE layer. It is stored as a numpy archive
(`.npz`, no pickle) with the keys of `../shared/traces/*.npz`:

    experts      int16   [T, L, K]  expert ids per token and MoE layer, highest gate weight first
    weights      float16 [T, L, K]  gate weights of those experts (as the router produced them)
    seq_offsets  int64   [S+1]      token t of sequence s is row seq_offsets[s] + t
    meta         0-d str            JSON: at least num_experts and top_k

and, when the runtime recorded them:

    token_ids    int64   [T]        the token id fed to the model at that row
    hidden       float16 [T, L, H]  the hidden state entering each MoE layer's router

`weights` and `hidden` are written as float16 when every value fits (|x| <= 65504), and as float32
otherwise (a member that float16 would turn to inf, e.g. a hidden state with large activations):
readers take either dtype.

Rows are in sequence order: row t+1 of a sequence is the token that followed row t, so replaying a
sequence row by row is a batch-1 decode of it. Every sequence starts at position 0 (the format stores
no positions): the runtime's recorder leaves out a sequence that was already running when the
recording started, rather than write it from the middle.

Glossary: T tokens, L MoE layers, K experts per token (top-k), E experts per layer, S sequences,
H hidden size.
"""
from __future__ import annotations

import json
import os
import secrets
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


MAX_EXPERTS = 2**15  # expert ids are stored as int16


def compact_floats(a: np.ndarray) -> np.ndarray:
    """`a` as float16 if that loses no value to overflow (values past 65504 would become inf), else float32."""
    a = np.asarray(a)
    if a.dtype == np.float16:  # already as small as it gets: no trial copy (a saved trace's hidden states are)
        return a
    with np.errstate(over="ignore"):  # the overflow is the question asked, not an accident to warn about
        half = a.astype(np.float16)
    if np.array_equal(np.isinf(half), np.isinf(a)):  # an inf already there stays what it was
        return half
    return a.astype(np.float32)


@dataclass
class RoutingTrace:
    experts: np.ndarray  # int16 [T, L, K]
    weights: np.ndarray  # float16 [T, L, K] (float32 when a value does not fit float16)
    seq_offsets: np.ndarray  # int64 [S+1]
    num_experts: int
    token_ids: np.ndarray | None = None  # int64 [T]
    hidden: np.ndarray | None = None  # float16 [T, L, H] (float32 when a value does not fit float16)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.experts.ndim != 3 or 0 in self.experts.shape[1:]:
            raise ValueError(f"trace: experts must be [T, L, K] with L, K >= 1, got shape {tuple(self.experts.shape)}")
        if self.weights.shape != self.experts.shape:
            raise ValueError(
                f"trace: weights shape {tuple(self.weights.shape)} != experts shape {tuple(self.experts.shape)}"
            )
        if not 1 <= self.num_experts <= MAX_EXPERTS:
            raise ValueError(f"trace: num_experts={self.num_experts} must be >= 1 and at most {MAX_EXPERTS} "
                             "(expert ids are stored as int16)")
        offs = self.seq_offsets
        if offs.ndim != 1 or len(offs) < 1 or offs[0] != 0 or offs[-1] != self.num_tokens or np.any(np.diff(offs) < 0):
            raise ValueError(
                f"trace: seq_offsets must rise from 0 to T={self.num_tokens}, got {offs[:3]}..{offs[-3:]}"
            )
        if self.num_tokens and (self.experts.min() < 0 or self.experts.max() >= self.num_experts):
            raise ValueError(
                f"trace: expert ids must lie in [0, num_experts={self.num_experts}), "
                f"got [{self.experts.min()}, {self.experts.max()}]"
            )
        if self.token_ids is not None and self.token_ids.shape != (self.num_tokens,):
            raise ValueError(f"trace: token_ids must be [T={self.num_tokens}], got {self.token_ids.shape}")
        if self.hidden is not None and (self.hidden.ndim != 3 or self.hidden.shape[:2] != self.experts.shape[:2]):
            raise ValueError(f"trace: hidden must be [T, L, H], got {self.hidden.shape}")

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    @property
    def num_sequences(self) -> int:
        return len(self.seq_offsets) - 1

    def sequence(self, s: int) -> slice:
        self._check_seq_ids("sequence", [s])
        return slice(int(self.seq_offsets[s]), int(self.seq_offsets[s + 1]))

    def _check_seq_ids(self, what: str, seq_ids: list[int]) -> None:
        bad = [s for s in seq_ids if not 0 <= s < self.num_sequences]
        if bad:  # -1 would be rows seq_offsets[-1]..seq_offsets[0]: an empty sequence, silently
            raise ValueError(f"{what}: sequence ids must lie in [0, {self.num_sequences}), got {bad[:5]}")

    def prev_index(self) -> np.ndarray:
        """int64 [T]: row of the previous token of the same sequence, -1 at a sequence start."""
        prev = np.arange(self.num_tokens, dtype=np.int64) - 1
        prev[self.seq_offsets[:-1][np.diff(self.seq_offsets) > 0]] = -1
        return prev

    def select_sequences(self, seq_ids) -> "RoutingTrace":
        """A new trace holding whole sequences `seq_ids` (integers), in that order."""
        seq_ids = list(seq_ids)  # read twice below: an iterator would be empty the second time
        bad = [s for s in seq_ids if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer))]
        if bad:  # int() read a mask [False, True] as ids 0, 1 (every sequence) and 0.9 as 0, silently
            raise ValueError(f"select_sequences: sequence ids must be integers, got {type(bad[0]).__name__} "
                             f"{bad[0]!r} (for a boolean mask over sequences pass np.flatnonzero(mask))")
        seq_ids = [int(s) for s in seq_ids]
        self._check_seq_ids("select_sequences", seq_ids)
        rows = [np.arange(self.seq_offsets[s], self.seq_offsets[s + 1]) for s in seq_ids]
        idx = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        lens = [len(r) for r in rows]
        return RoutingTrace(
            experts=self.experts[idx],
            weights=self.weights[idx],
            seq_offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
            num_experts=self.num_experts,
            token_ids=None if self.token_ids is None else self.token_ids[idx],
            hidden=None if self.hidden is None else self.hidden[idx],
            meta=dict(self.meta),
        )

    def save(self, path: str | Path) -> None:
        # the counts are this trace's (a selection of a shared trace carried the whole file's)
        meta = dict(self.meta, num_experts=self.num_experts, top_k=self.top_k, tokens=self.num_tokens,
                    sequences=self.num_sequences)
        arrays = dict(
            experts=self.experts.astype(np.int16),
            weights=compact_floats(self.weights),
            seq_offsets=self.seq_offsets.astype(np.int64),
            meta=np.array(json.dumps(meta)),
        )
        if self.token_ids is not None:
            arrays["token_ids"] = self.token_ids.astype(np.int64)
        if self.hidden is not None:
            arrays["hidden"] = compact_floats(self.hidden)
        if hasattr(path, "write"):  # a file object (the server's download)
            np.savez(path, **arrays)
            return
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"trace {path}: is a directory, expected a file name")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"trace {path}: directory {path.parent} does not exist")
        # written beside the target, then renamed over it: a write that fails midway (disk full, Ctrl-C)
        # leaves the previous trace whole, not truncated; "xb" (not mkstemp) keeps the umask's permissions
        part = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
        try:
            with open(part, "xb") as f:  # a file object: np.savez would add .npz to a name without it
                np.savez(f, **arrays)
            os.replace(part, path)
        finally:
            part.unlink(missing_ok=True)


OPTIONAL_KEYS = ("token_ids", "hidden")  # the members a trace may lack; experts, weights, seq_offsets, meta it may not


def load_trace(path: str | Path, keys=None) -> RoutingTrace:
    """Read a trace file (the shared traces or the runtime's own); no pickle is ever executed.

    keys: which of the optional members (OPTIONAL_KEYS) to read; None reads every one the file holds.
    A caller that needs expert ids only passes () and the hidden states (float16 [T, L, H]: ~850 MB for a
    DeepSeek-shaped trace) are never read from the archive: the trace's `hidden` is then None.
    Every failure is a ValueError naming the file (FileNotFoundError when it is absent)."""
    keys = OPTIONAL_KEYS if keys is None else tuple(keys)
    unknown = [k for k in keys if k not in OPTIONAL_KEYS]
    if unknown:  # a misspelt 'hiden' would load without the hidden states the caller asked for
        raise ValueError(f"load_trace: keys may name {', '.join(OPTIONAL_KEYS)} (the rest is always read), "
                         f"got {unknown[0]!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"trace file {path} does not exist")
    try:
        return _read_trace(path, keys)
    except ValueError as e:
        raise ValueError(f"trace {path}: {e}") from None
    # a directory, not a numpy archive, or one whose directory asks for a zip version past Python's
    except (OSError, zipfile.BadZipFile, EOFError, NotImplementedError) as e:
        raise ValueError(f"trace {path}: not a readable .npz routing trace ({e})") from None


def _read_trace(path: Path, optional: tuple[str, ...]) -> RoutingTrace:
    # np.load takes anything else for a pickle (and says so) or a bare .npy array
    if not zipfile.is_zipfile(path):
        raise ValueError("not an .npz archive (a routing trace is one: experts, weights, seq_offsets, meta)")
    with np.load(path, allow_pickle=False) as z:
        for key in ("experts", "weights", "seq_offsets"):
            if key not in z.files:
                raise ValueError(f"missing key {key!r} (has {sorted(z.files)})")
        arrays = {}
        for key in ("experts", "weights", "seq_offsets", "meta", *optional):
            if key in z.files:  # np.load's archive reads a member only here: one not asked for stays on disk
                try:
                    arrays[key] = z[key]
                except ValueError as e:  # a truncated or garbled .npy member
                    raise ValueError(f"{key!r}: {e}") from None
                # a garbled compressed member (np.savez_compressed), compression-method field (NotImplementedError)
                # or flag bits (RuntimeError: "is encrypted") were tracebacks from every command reading traces
                except (zlib.error, NotImplementedError, RuntimeError, MemoryError, zipfile.BadZipFile, EOFError,
                        OSError) as e:  # MemoryError: a header claiming a shape past memory (10**13 rows)
                    raise ValueError(f"{key!r}: cannot be read ({e})") from None
                if not isinstance(arrays[key], np.ndarray):  # np.load hands back the raw bytes of a non-.npy member
                    raise ValueError(f"{key!r} is not a numpy array (.npy) in the archive")
    meta = {}
    if "meta" in arrays:
        try:
            meta = json.loads(str(arrays["meta"]))
        except ValueError as e:
            raise ValueError(f"'meta' is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"'meta' must be a JSON object, got {type(meta).__name__}")
    experts, offsets = arrays["experts"], arrays["seq_offsets"]
    # a float id, offset or token would be truncated silently by the int casts downstream
    for key in ("experts", "seq_offsets", "token_ids"):
        if key in arrays and not np.issubdtype(arrays[key].dtype, np.integer):
            raise ValueError(f"{key!r} must hold integers, got dtype {arrays[key].dtype}")
    for key in ("weights", "hidden"):
        arr = arrays.get(key)
        if arr is not None and not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{key!r} must hold numbers, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arrays["weights"])):  # a NaN weight would replay as NaN logits
        raise ValueError(f"'weights' must be finite, got {int(np.sum(~np.isfinite(arrays['weights'])))} NaN/inf")
    if experts.ndim == 3 and experts.shape[-1] > 1 and experts.size:  # a router's top-k are distinct experts
        ordered = np.sort(experts, axis=-1)
        same = ordered[..., 1:] == ordered[..., :-1]
        if same.any():
            t, layer, k = (int(i[0]) for i in np.nonzero(same))
            raise ValueError(f"'experts' row {t}, MoE layer {layer} holds expert {ordered[t, layer, k]} twice "
                             "(a row's top-k ids are distinct)")
    num_experts = meta.get("num_experts", int(experts.max()) + 1 if experts.size else 1)
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"meta num_experts must be a positive integer, got {num_experts!r}")
    return RoutingTrace(
        experts=experts,
        weights=arrays["weights"],
        seq_offsets=offsets.astype(np.int64),
        num_experts=num_experts,
        token_ids=arrays.get("token_ids"),
        hidden=arrays.get("hidden"),
        meta=meta,
    )


def split_sequences(trace: RoutingTrace, test_fraction: float, seed: int = 0) -> tuple[RoutingTrace, RoutingTrace]:
    """Split by whole sequences (never by rows): (train, test)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if trace.num_sequences < 2:  # one side would be empty
        raise ValueError(f"split_sequences: needs at least 2 sequences to split, the trace has {trace.num_sequences}")
    order = np.random.default_rng(seed).permutation(trace.num_sequences)
    n_test = min(max(1, int(round(test_fraction * trace.num_sequences))), trace.num_sequences - 1)  # >= 1 each side
    return trace.select_sequences(np.sort(order[n_test:])), trace.select_sequences(np.sort(order[:n_test]))
