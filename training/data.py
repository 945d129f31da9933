"""Corpus split, byte-level BPE tokenizer, and token streams for the default model.

The held-out split is defined on raw text (the last HELDOUT_FRACTION of every file, cut at a line
break) so that tests can rebuild it from `../shared/corpus` without any file written by training.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

CORPUS_FILES = ("python311_docs.txt", "c4_sample.txt", "wikipedia_sample.txt")
# Sampling weight of each file when drawing training windows. The Python docs are ~75% of the bytes;
# down-weighting them keeps natural-language (English web text, multilingual Wikipedia) well represented.
SOURCE_WEIGHTS = {"python311_docs.txt": 0.5, "c4_sample.txt": 0.3, "wikipedia_sample.txt": 0.2}
HELDOUT_FRACTION = 0.02
EOS = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (EOS, PAD) + CHAT_TOKENS
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def split_text(text: str, heldout_fraction: float = HELDOUT_FRACTION) -> tuple[str, str]:
    """(train, heldout): heldout is the tail of `text` from the first line break after the cut, or from
    the cut itself when no line break follows it (a file of one long line had no held-out text at all)."""
    cut = int(len(text) * (1.0 - heldout_fraction))
    nl = text.find("\n", cut)
    cut = cut if nl < 0 else nl + 1
    return text[:cut], text[cut:]


def read_corpus(corpus_dir: Path) -> dict[str, tuple[str, str]]:
    """{file name: (train text, heldout text)} for every file in CORPUS_FILES."""
    out = {}
    for name in CORPUS_FILES:
        path = Path(corpus_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {path} is missing (need all of {CORPUS_FILES})")
        try:
            out[name] = split_text(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:  # the bare error names no file
            raise ValueError(f"corpus file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return out


def corpus_fingerprint(corpus: dict[str, tuple[str, str]]) -> str:
    """12 hex digits of a SHA-256 over the corpus's files (names and text): the tokenized-data cache's key."""
    h = hashlib.sha256()
    for name, (train, heldout) in sorted(corpus.items()):
        h.update(f"{name}\0{len(train)}\0{len(heldout)}\0".encode())
        h.update(train.encode("utf-8"))
        h.update(heldout.encode("utf-8"))
    return h.hexdigest()[:12]


def train_tokenizer(train_texts: dict[str, str], vocab_size: int, sample_chars: int):
    """Byte-level BPE trained on the first `sample_chars` of each file's training text.

    Returns a `transformers.PreTrainedTokenizerFast` with the special tokens and chat template set.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = []
    for text in train_texts.values():
        lines.extend(text[:sample_chars].splitlines(keepends=True))
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=None,
        pad_token=PAD,
        additional_special_tokens=list(CHAT_TOKENS),
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode_stream(tokenizer, text: str, chunk_chars: int = 1 << 16) -> np.ndarray:
    """Token ids of `text` as uint16 (vocab < 65536), encoded in line-aligned chunks for speed."""
    chunks, start = [], 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        nl = text.find("\n", end)
        end = len(text) if nl < 0 else nl + 1
        chunks.append(text[start:end])
        start = end
    if not chunks:  # np.concatenate of nothing raises
        return np.zeros(0, dtype=np.uint16)
    ids = tokenizer.backend_tokenizer.encode_batch(chunks, add_special_tokens=False)
    return np.concatenate([np.asarray(e.ids, dtype=np.uint16) for e in ids])


class WindowSampler:
    """Draws (batch, seq_len + 1) windows from per-file token streams, deterministically per seed.

    Each row first picks a file by SOURCE_WEIGHTS, then a uniform random offset in that file's stream.
    """

    def __init__(self, streams: dict[str, np.ndarray], seq_len: int, seed: int):
        self.names = list(streams)
        self.streams = [torch.from_numpy(streams[n].astype(np.int64)) for n in self.names]
        w = torch.tensor([SOURCE_WEIGHTS[n] for n in self.names], dtype=torch.float64)
        self.weights = w / w.sum()
        self.seq_len = seq_len
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, batch_size: int) -> torch.Tensor:
        src = torch.multinomial(self.weights, batch_size, replacement=True, generator=self.gen)
        rows = []
        for s in src.tolist():
            stream = self.streams[s]
            off = int(torch.randint(0, len(stream) - self.seq_len - 1, (1,), generator=self.gen))
            rows.append(stream[off : off + self.seq_len + 1])
        return torch.stack(rows)  # (batch, seq_len + 1)


def heldout_windows(streams: dict[str, np.ndarray], seq_len: int, per_file: int) -> torch.Tensor:
    """(n_files * per_file, seq_len + 1) evenly spaced, non-overlapping held-out windows."""
    rows = []
    for name in streams:
        s = torch.from_numpy(streams[name].astype(np.int64))
        n = min(per_file, len(s) // (seq_len + 1))
        step = len(s) // max(n, 1)
        rows.extend(s[i * step : i * step + seq_len + 1] for i in range(n))
    return torch.stack(rows)


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")
