"""Control frames on tcp are signed (HMAC-SHA256 under a key the frontend draws per engine) and CURVE-encrypted: a
process that connects to a tcp control port, or binds one before the frontend does, is neither heard nor obeyed, and
serving goes on. ipc frames (a directory only this user can open) are not signed: it cost 3x on a step's logits."""
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import zmq

from moe_serve.distributed import messages as m
from moe_serve.distributed.endpoints import free_tcp_port_run
from moe_serve.distributed.groups import ParallelLayout
from moe_serve.distributed.launcher import WorkerGroup
from moe_serve.distributed.probe import expected_probe_logits
from moe_serve.distributed.signing import KEY_ENV, Signer, new_key, secure
from tests.distributed.test_control import _plan, _spec

ROOT = Path(__file__).resolve().parents[2]


def test_signer_round_trip_and_refusals():
    key = new_key()
    assert len(key) >= 32 and key != new_key()  # drawn per engine, never a fixed default
    signer, payload = Signer(key), m.encode(m.Shutdown("bye"))
    assert bytes(signer.verify(signer.sign(payload))) == payload
    for forged in (payload, Signer(new_key()).sign(payload), signer.sign(payload)[:-1] + b"x", b"", b"\0" * 31):
        assert signer.verify(forged) is None
    with pytest.raises(ValueError, match=f"{KEY_ENV}: at least 16 bytes"):
        Signer(b"short")
    with pytest.raises(ValueError, match=f"{KEY_ENV}: at least 16 bytes"):
        Signer(b"short", signs=False)
    plain = Signer(key, signs=False)  # ipc: frames pass unsigned, unchanged
    assert plain.sign(payload) == payload and bytes(plain.verify(payload)) == payload


def test_only_tcp_control_frames_are_signed():
    for transport, signs in (("ipc", False), ("tcp", True)):
        group = WorkerGroup(_spec(1, 2), world_size=2, startup_timeout_s=60, heartbeat_timeout_s=20,
                            transport=transport)
        try:
            assert group.signer.signs is signs
            _assert_serves_exact(group)  # both sides agree on signing: steps are answered
        finally:
            group.shutdown()
        assert all(p.returncode == 0 for p in group.procs)


def _assert_serves_exact(group: WorkerGroup, steps=range(2)) -> None:
    layout = ParallelLayout(1, 2)
    for step in steps:
        seqs = [[3 + step], [4 + step]]
        group.broadcast(_plan(step, seqs))
        outs = group.collect(step, len(layout.output_ranks()), timeout_s=10)
        assert len(outs) == 2
        for out in outs:
            want = expected_probe_logits([s[-1] for s in seqs], out.rank, layout.tp_groups(), layout.ep_groups())
            assert torch.equal(out.logits.to_tensor(), want), (out.rank, step)


def test_a_stranger_on_the_up_socket_is_not_heard(caplog, transport="tcp"):
    # any local process may connect to a tcp control port: a well-formed StepOutput it pushed was taken for a rank's
    # (wrong logits served), and a WorkerError failed every request. Over tcp (CURVE) it cannot even connect. (The
    # ipc socket's directory admits this user's processes only: the same trust as the frontend's own memory.)
    group = WorkerGroup(_spec(1, 2), world_size=2, startup_timeout_s=60, heartbeat_timeout_s=20, transport=transport)
    ctx = zmq.Context()
    stray = ctx.socket(zmq.PUSH)
    stray.setsockopt(zmq.LINGER, 0)
    try:
        stray.connect(group.up.getsockopt_string(zmq.LAST_ENDPOINT))
        wrong = Signer(new_key())
        for step in range(2):
            for rank in range(2):
                fake = m.encode(m.StepOutput(step, rank, [0, 1], m.TensorBlob.from_tensor(torch.full((2, 3), -7.0,
                                                                                                dtype=torch.float64)), 0.0))
                stray.send(fake)
                stray.send(wrong.sign(fake))
        stray.send(m.encode(m.WorkerError(0, 0, "forged failure")))
        time.sleep(0.5)  # the monitor has read them
        _assert_serves_exact(group)
        assert group.error is None
        assert "dropped a" not in caplog.text, caplog.text  # nothing got through to be dropped
    finally:
        stray.close()
        ctx.term()
        group.shutdown()
    assert all(p.returncode == 0 for p in group.procs)


def test_a_rank_obeys_only_signed_commands(capfd):
    # on tcp, frames reach a rank only through the frontend's sockets (CURVE), but one not signed with the engine's
    # key (here sent on the frontend's own down socket, bypassing the signature) is dropped before it is decoded
    group = WorkerGroup(_spec(1, 2), world_size=2, startup_timeout_s=60, heartbeat_timeout_s=20, transport="tcp")
    try:
        for s in group.down:
            s.send(m.encode(m.Shutdown("unsigned")))
            s.send(Signer(new_key()).sign(m.encode(m.Shutdown("signed with another key"))))
        time.sleep(0.5)  # a rank that obeyed would be gone by now
        assert all(p.poll() is None for p in group.procs)
        _assert_serves_exact(group)
    finally:
        group.shutdown()
    assert all(p.returncode == 0 for p in group.procs)
    assert capfd.readouterr().err.count("signature does not verify; not executed") == 4


_EXTERNAL_RANK = """
from moe_serve.distributed.worker import external_spec
spec = external_spec(timeout_s=20)
print("SPEC", spec.runner, spec.rank, flush=True)
"""


def _bind(sock, addr: str) -> None:
    """Bind, waiting for the previous socket's close to release the port (zmq closes in its I/O thread)."""
    for _ in range(50):
        try:
            return sock.bind(addr)
        except zmq.ZMQError:
            time.sleep(0.05)
    sock.close()
    raise AssertionError(f"{addr} stayed in use")


def test_a_torchrun_rank_takes_its_spec_only_from_the_frontend(tmp_path):
    # a rank started by torchrun pulls its spec (which names the code it runs) from PORT+1+r: a process that bound
    # that port first could hand it any spec. Without the key given to torchrun's ranks it cannot even reach the
    # rank (CURVE), and a Configure not signed with that key is dropped
    port, key = free_tcp_port_run(2), new_key()
    addr = f"tcp://127.0.0.1:{port + 1}"
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1",
               MOE_SERVE_FRONTEND=f"127.0.0.1:{port}", **{KEY_ENV: key.hex()})
    good = _spec(1, 1)
    evil = m.encode(m.Configure(replace(good, runner="evil:code").to_json()))
    ctx = zmq.Context()
    rank = subprocess.Popen([sys.executable, "-c", _EXTERNAL_RANK], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for stranger_key in (None, new_key()):  # a plain socket, then a CURVE server under another key
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            if stranger_key is not None:
                secure(sock, stranger_key, addr, server=True)
            _bind(sock, addr)
            sent, t = 0, time.monotonic()
            while time.monotonic() - t < 1.0:  # the rank tries to connect (every 0.1 s): the handshake fails
                for frame in (evil, Signer(stranger_key or new_key()).sign(evil)):
                    try:
                        sock.send(frame, zmq.NOBLOCK)
                        sent += 1
                    except zmq.Again:  # no peer to take it
                        time.sleep(0.05)
            sock.unbind(addr)
            sock.close()
            assert sent == 0, "the stranger reached the rank"
        sock = ctx.socket(zmq.PUSH)  # the frontend, late
        sock.setsockopt(zmq.LINGER, 1000)
        secure(sock, key, addr, server=True)
        _bind(sock, addr)
        sock.send(Signer(new_key()).sign(evil))  # with the CURVE keys but not the signing key: still dropped
        sock.send(Signer(key).sign(m.encode(m.Configure(good.to_json()))))
        try:
            out, err = rank.communicate(timeout=60)
        finally:
            sock.close()
    finally:
        if rank.poll() is None:
            rank.kill()
        ctx.term()
    assert rank.returncode == 0, err
    assert out.strip() == "SPEC moe_serve.distributed.probe:build 0", (out, err)
    assert err.count("signature does not verify; not executed") == 1, err


def test_a_worker_endpoint_without_a_control_key_is_refused_naming_it(monkeypatch):
    # ranks started by torchrun cannot be handed a fresh key: the frontend and they share the one in KEY_ENV
    monkeypatch.delenv(KEY_ENV)
    port = free_tcp_port_run(3)
    with pytest.raises(ValueError, match=f"parallel.worker_endpoint: set {KEY_ENV} "):
        WorkerGroup(_spec(1, 2), world_size=2, startup_timeout_s=5, external=f"tcp://127.0.0.1:{port}")
    monkeypatch.setenv(KEY_ENV, "not hex")
    with pytest.raises(ValueError, match=f"{KEY_ENV} must be hex"):
        WorkerGroup(_spec(1, 2), world_size=2, startup_timeout_s=5, external=f"tcp://127.0.0.1:{port}")


def test_a_stranger_on_a_tcp_down_port_gets_no_step_plan():
    # a PUSH socket deals its frames round-robin to every peer: a stranger that connected to rank 0's tcp port
    # took every other step plan (the prompts' tokens), and rank 0, missing them, stalled the group. tcp control
    # sockets are CURVE-encrypted under keys derived from the control key: a stranger cannot connect at all
    group = WorkerGroup(_spec(1, 2), world_size=2, startup_timeout_s=60, heartbeat_timeout_s=20, transport="tcp")
    ctx = zmq.Context()
    thief = ctx.socket(zmq.PULL)
    thief.setsockopt(zmq.LINGER, 0)
    try:
        thief.connect(group.down[0].getsockopt_string(zmq.LAST_ENDPOINT))
        time.sleep(0.5)  # connected (or refused) by now
        _assert_serves_exact(group, steps=range(4))
        assert not thief.poll(500), "a stranger received a step plan"
    finally:
        thief.close()
        ctx.term()
        group.shutdown()
    assert all(p.returncode == 0 for p in group.procs)
