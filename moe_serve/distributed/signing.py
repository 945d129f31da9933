"""Signed control frames on tcp: a frame is heard only when it carries the HMAC-SHA256 of its bytes under the engine's key.

With `parallel.control_transport=tcp` (and `parallel.worker_endpoint`) the control sockets are ports any process
on the machine (or the network) may connect to: every frame, both ways, is `HMAC-SHA256(key, payload)` (32 bytes)
followed by the msgpack payload (Jupyter's messaging protocol signs the same way). A receiver checks the digest, in
constant time, before it decodes a byte (msgspec, never pickle); a frame that does not verify is dropped and logged,
never executed. ipc sockets (the default) sit in a directory only this user can open (mkdtemp, mode 0700): their
frames are not signed. Signing them guarded against no one (a process of the same user can read the key from the
frontend's memory) and tripled the cost of returning a step's logits (16 sequences x 152k vocabulary, 9.3 MiB:
7.3 -> 24.9 ms on the 2-core CPU).

The key: the frontend draws a fresh one per worker group (`new_key`) and hands it to the ranks it starts in their
environment (`KEY_ENV`, never on a command line, which every user can read in /proc); ranks started by torchrun
get the same variable from whoever starts them and the frontend (`parallel.worker_endpoint`) reads it from its own.
Signatures keep strangers from being heard, not from listening: a PUSH socket deals its frames to every peer in
turn, so one connected to a rank's tcp port took step plans. So tcp sockets also speak CURVE (`secure`) under keys
derived from the same key: a process without it cannot connect at all, and frames on the wire are encrypted.
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


def over_tcp(address: str) -> bool:
    """Whether a control address is a tcp port (signed and CURVE) rather than a private ipc path (neither)."""
    return address.startswith("tcp://")


class Signer:
    """sign(payload) -> digest + payload; verify(frame) -> the payload (a memoryview) or None if it does not verify.
    signs=False (ipc sockets): frames pass as they are, unsigned; the key still serves `secure`."""

    def __init__(self, key: bytes, signs: bool = True):
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"{KEY_ENV}: at least {MIN_KEY_BYTES} bytes of key needed, got {len(key)}")
        self.key, self.signs = bytes(key), signs

    def _digest(self, payload) -> bytes:
        return hmac.new(self.key, payload, hashlib.sha256).digest()

    def sign(self, payload: bytes) -> bytes:
        return self._digest(payload) + payload if self.signs else payload

    def verify(self, frame) -> memoryview | None:
        view = memoryview(frame)
        if not self.signs:
            return view
        if len(view) < DIGEST_BYTES:
            return None
        payload = view[DIGEST_BYTES:]
        return payload if hmac.compare_digest(view[:DIGEST_BYTES], self._digest(payload)) else None


def _curve_pair(key: bytes, label: bytes) -> tuple[bytes, bytes]:
    """(public, secret) Z85 CURVE keys derived from the control key (any 32 bytes are a curve25519 secret)."""
    import zmq
    from zmq.utils import z85

    secret = z85.encode(hmac.new(key, label, hashlib.sha256).digest())
    return zmq.curve_public(secret), secret


def secure(sock, key: bytes, address: str, server: bool) -> None:
    """Before bind/connect: a tcp socket speaks CURVE (encrypted, and only to peers that know the server's public
    key, derived from the control key and never sent): a stranger on a tcp port can neither connect, send nor
    take frames (a PUSH deals frames round-robin to every peer: one connected to a rank's port took step plans).
    ipc sockets are private by their directory's permissions: left as they are (no encryption cost)."""
    if not over_tcp(address):
        return
    server_public, server_secret = _curve_pair(key, b"moe-serve curve server")
    if server:
        sock.curve_secretkey, sock.curve_publickey, sock.curve_server = server_secret, server_public, True
        return
    sock.curve_publickey, sock.curve_secretkey = _curve_pair(key, b"moe-serve curve client")
    sock.curve_serverkey = server_public
