"""The tokenizer of a checkpoint directory, behind a few methods: encode, decode, token_bytes, the EOS ids.

`tokenizer.json` is read with the `tokenizers` library (fast, no Python per token); a checkpoint
that ships only other tokenizer files falls back to `transformers.AutoTokenizer`. A checkpoint with
no tokenizer at all still serves prompts given as token ids (its text output is empty).
"""
from __future__ import annotations

import json
from pathlib import Path

from moe_serve.models.checkpoint import CheckpointError


class Tokenizer:
    def __init__(self, backend, kind: str, eos_token_ids: list[int]):
        self.backend = backend  # tokenizers.Tokenizer, a transformers tokenizer, or None
        self.kind = kind  # "tokenizers" | "transformers" | "none"
        self.eos_token_ids = eos_token_ids
        self._token_bytes = None  # TokenBytes, built on first use (it reads the whole vocabulary)

    @property
    def available(self) -> bool:
        return self.backend is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds what the tokenizer's post-processor adds (a BOS
        for Llama/Mixtral tokenizers). A rendered chat template already holds its special tokens."""
        if self.backend is None:
            raise ValueError("prompt: this checkpoint has no tokenizer; pass the prompt as a list of token ids")
        if not text.isascii():  # JSON's "\ud800" gives a lone surrogate, which tokenizers fails on (TypeError)
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"text is not valid Unicode: a lone surrogate {text[exc.start]!r} at character "
                                 f"{exc.start}") from None
        if self.kind == "tokenizers":
            # the batch call releases the GIL while it works (the single one holds it: 2.5 s for a 1 MB
            # prompt), so a server thread tokenizes while the event loop goes on streaming; same ids
            return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.backend is None:
            return ""
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, exact also for part of a multi-byte character (whose decoded
        text is U+FFFD); the UTF-8 of its decoded text where the vocabulary does not spell bytes."""
        if self._token_bytes is None:
            from moe_serve.engine.token_bytes import TokenBytes

            fast = self.backend if self.kind == "tokenizers" else getattr(self.backend, "backend_tokenizer", None)
            self._token_bytes = TokenBytes(fast) if fast is not None else (lambda token_id: None)
        found = self._token_bytes(token_id)
        return found if found is not None else self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def apply_chat_template(self, messages: list[dict]) -> str:
        """Minimal chat formatting: the checkpoint's template when transformers has one, else plain turns."""
        if self.kind == "transformers" and getattr(self.backend, "chat_template", None):
            return self.backend.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        turns = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join(turns) + "\nassistant:"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _eos_ids(model_dir: Path, backend, kind: str) -> list[int]:
    """EOS ids from generation_config.json, then config.json, then the tokenizer's eos token."""
    for name in ("generation_config.json", "config.json"):
        eos = _read_json(model_dir / name).get("eos_token_id")
        if eos is not None:
            ids = eos if isinstance(eos, list) else [eos]
            # int() took "x" to a ValueError naming no file, and 2.9 to token 2
            if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in ids):
                raise CheckpointError(f"{model_dir / name} field 'eos_token_id' must be a token id or a list of "
                                      f"token ids, got {eos!r}")
            return list(ids)
    token = _read_json(model_dir / "tokenizer_config.json").get("eos_token")
    if isinstance(token, dict):
        token = token.get("content")
    if token and backend is not None:
        tid = backend.token_to_id(token) if kind == "tokenizers" else backend.convert_tokens_to_ids(token)
        if tid is not None:
            return [int(tid)]
    return []


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The checkpoint's tokenizer; a tokenizer file that cannot be loaded is a CheckpointError naming it."""
    model_dir = Path(model_dir)
    backend, kind = None, "none"
    path = model_dir / "tokenizer.json"
    others = [f for f in ("tokenizer.model", "vocab.json", "tokenizer_config.json") if (model_dir / f).exists()]
    if path.exists():
        from tokenizers import Tokenizer as FastTokenizer

        try:
            backend, kind = FastTokenizer.from_file(str(path)), "tokenizers"
        except Exception as e:  # tokenizers raises a bare Exception: a traceback, not an error naming the file
            raise CheckpointError(f"{path} is not a readable tokenizer (truncated or corrupt?): {e}") from None
    elif others:
        from transformers import AutoTokenizer

        try:
            backend, kind = AutoTokenizer.from_pretrained(str(model_dir)), "transformers"
        except Exception as e:  # OSError, ValueError, JSONDecodeError, ...: one line of it, naming the files
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"the tokenizer files of {model_dir} ({', '.join(others)}) cannot be loaded "
                                  f"(no tokenizer.json; transformers: {reason})") from None
    return Tokenizer(backend, kind, _eos_ids(model_dir, backend, kind))
