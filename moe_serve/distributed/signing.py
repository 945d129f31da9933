"""Signed control frames: a frame is heard only when it carries the HMAC-SHA256 of its bytes under the engine's key.

With `parallel.control_transport=tcp` (and `parallel.worker_endpoint`) the control sockets are ports any process
on the machine (or the network) may connect to; ipc sockets sit in a private temp dir, but both take the same path:
every frame, both ways, is `HMAC-SHA256(key, payload)` (32 bytes) followed by the msgpack payload (Jupyter's
messaging protocol signs the same way). A receiver checks the digest, in constant time, before it decodes a byte
(msgspec, never pickle); a frame that does not verify is dropped and logged, never executed.

The key: the frontend draws a fresh one per worker group (`new_key`) and hands it to the ranks it starts in their
environment (`KEY_ENV`, never on a command line, which every user can read in /proc); ranks started by torchrun
get the same variable from whoever starts them and the frontend (`parallel.worker_endpoint`) reads it from its own.
Signatures keep strangers from being heard; they do not hide the frames (a stranger connected to a tcp port that
pushes step plans can take its share of them): keep tcp control ports off untrusted networks.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets

KEY_ENV = "MOE_SERVE_CONTROL_KEY"  # hex; the ranks remove it from their environment once read
DIGEST_BYTES = 32
MIN_KEY_BYTES = 16


def new_key() -> bytes:
    """A fresh random key (32 bytes) for one worker group."""
    return secrets.token_bytes(32)


def key_from_env(environ=os.environ, pop: bool = False) -> bytes | None:
    """The key in `KEY_ENV` (hex), or None when it is not set; a ValueError naming the variable for a bad one.
    pop: also remove it (a rank's child processes, e.g. a compiler, need not see it)."""
    text = environ.pop(KEY_ENV, None) if pop else environ.get(KEY_ENV)
    if text is None:
        return None
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError(f"{KEY_ENV} must be hex (e.g. python -c 'import secrets; print(secrets.token_hex(32))')"
                         ) from None
    Signer(key)  # the length check
    return key


class Signer:
    """sign(payload) -> digest + payload; verify(frame) -> the payload (a memoryview) or None if it does not verify."""

    def __init__(self, key: bytes):
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"{KEY_ENV}: at least {MIN_KEY_BYTES} bytes of key needed, got {len(key)}")
        self._key = bytes(key)

    def _digest(self, payload) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def sign(self, payload: bytes) -> bytes:
        return self._digest(payload) + payload

    def verify(self, frame) -> memoryview | None:
        view = memoryview(frame)
        if len(view) < DIGEST_BYTES:
            return None
        payload = view[DIGEST_BYTES:]
        return payload if hmac.compare_digest(view[:DIGEST_BYTES], self._digest(payload)) else None
