"""One worker rank: join the groups, load its shard, then run step plans until told to stop.

Started by the frontend (`python -m moe_serve.distributed.worker`, its spec as JSON in the
environment variable MOE_SERVE_WORKER_SPEC) or by torchrun (see `launch_torchrun`). A side thread
sends a Heartbeat every interval from process start, so the frontend can tell a slow rank from a
dead one. Any exception is reported as a WorkerError (with the traceback) before the rank exits.
On tcp every control frame, both ways, is signed with the engine's key and checked before it is decoded (signing.py).
"""
from __future__ import annotations

import ctypes
import importlib
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field

import zmq

from moe_serve.distributed import messages as m
from moe_serve.distributed.signing import KEY_ENV, Signer, key_from_env, over_tcp, secure

SPEC_ENV = "MOE_SERVE_WORKER_SPEC"


@dataclass
class WorkerSpec:
    """Everything a rank needs to start (JSON-able: it travels in an environment variable)."""

    rank: int
    tp: int
    ep: int
    up: str  # frontend PULL address
    down: str  # this rank's PULL address (the frontend PUSHes to it)
    dist_init: str  # torch.distributed rendezvous: file://, tcp:// or env://
    runner: str  # "module:function" building the step runner: fn(spec, groups) -> runner
    runner_args: dict = field(default_factory=dict)  # JSON-able arguments of the runner (engine config, ...)
    device: str = "cpu"
    heartbeat_s: float = 0.5
    dist_timeout_s: float = 60.0
    threads: int = 1  # torch intra-op threads of this rank
    fault: str = ""  # tests only: "exit_before_ready", "hang_before_ready", "exit_at_step:N", "raise_at_step:N",
    # "drop_output_at_step:N"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> "WorkerSpec":
        return WorkerSpec(**json.loads(text))


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the frontend dies, so no orphan rank keeps a port or a core."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _verified(frame: bytes, signer: Signer, rank) -> memoryview | None:
    """The payload of a frame signed with the engine's key; None (and a line on stderr) for any other frame,
    which is never decoded, let alone executed."""
    payload = signer.verify(frame)
    if payload is None:
        print(f"rank {rank}: dropped a {len(frame)}-byte control frame whose signature does not verify; not executed",
              file=sys.stderr, flush=True)
    return payload


class _Heartbeat(threading.Thread):
    def __init__(self, ctx: zmq.Context, spec: WorkerSpec, signer: Signer):
        super().__init__(daemon=True, name=f"heartbeat-{spec.rank}")
        self.sock = ctx.socket(zmq.PUSH)  # its own socket: zmq sockets are not thread-safe
        self.sock.setsockopt(zmq.LINGER, 0)
        secure(self.sock, signer.key, spec.up, server=False)
        self.sock.connect(spec.up)
        self.spec, self.signer, self.step, self.phase, self.stop = spec, signer, -1, "starting", threading.Event()

    def run(self):
        while True:
            try:  # never block: with the frontend gone a PUSH waits for a peer forever (then dies in ctx.term())
                beat = m.Heartbeat(self.spec.rank, self.step, time.time(), self.phase)
                self.sock.send(self.signer.sign(m.encode(beat)), zmq.NOBLOCK)
            except zmq.Again:
                pass  # a heartbeat nobody can take is worth nothing later
            if self.stop.wait(self.spec.heartbeat_s):
                break
        self.sock.close()


def _load_runner(spec: WorkerSpec, groups):
    module, _, fn = spec.runner.partition(":")
    return getattr(importlib.import_module(module), fn)(spec, groups)


def run_worker(spec: WorkerSpec, key: bytes) -> int:
    """Serve until Shutdown; `key`: the engine's control key (on tcp every frame both ways is signed with it)."""
    t0 = time.time()
    signer = Signer(key, signs=over_tcp(spec.up))
    send = lambda msg: up.send(signer.sign(m.encode(msg)))  # noqa: E731
    ctx = zmq.Context()
    up = ctx.socket(zmq.PUSH)
    up.setsockopt(zmq.LINGER, 2000)
    secure(up, key, spec.up, server=False)  # tcp: CURVE (signing.secure)
    up.connect(spec.up)
    down = ctx.socket(zmq.PULL)
    down.setsockopt(zmq.LINGER, 0)
    secure(down, key, spec.down, server=False)
    down.connect(spec.down)
    hb = _Heartbeat(ctx, spec, signer)
    hb.start()
    step, gone = -1, None
    parent = os.getppid()
    try:
        if spec.fault == "exit_before_ready":
            os._exit(3)
        if spec.fault == "hang_before_ready":
            time.sleep(3600)
        launched = os.environ.get("WORLD_SIZE") if spec.dist_init == "env://" else None
        if launched is not None and int(launched) != max(spec.tp, spec.ep):
            # the rendezvous takes the frontend's world size: with more ranks launched, the group formed without
            # the extra ones, which waited for a spec that never came and, timing out, had torchrun stop them all
            raise ValueError(f"the launcher started WORLD_SIZE={launched} ranks; parallel.tp={spec.tp}, "
                             f"parallel.ep={spec.ep} need max(tp, ep)={max(spec.tp, spec.ep)}")
        import torch

        from moe_serve.distributed.groups import ParallelLayout, init_distributed

        torch.set_num_threads(spec.threads)
        hb.phase = "rendezvous"
        groups = init_distributed(ParallelLayout(spec.tp, spec.ep, spec.rank), torch.device(spec.device),
                                  spec.dist_init, spec.dist_timeout_s)
        hb.phase = "loading"
        runner = _load_runner(spec, groups)
        hb.phase = "serving"
        send(m.Ready(spec.rank, os.getpid(), socket.gethostname(), time.time() - t0))
        exit_at = int(spec.fault.split(":")[1]) if spec.fault.startswith("exit_at_step:") else -1
        # a rank from torchrun is no child of the frontend (no PDEATHSIG): when the frontend dies (its Shutdown
        # never comes) the only sign is its end of this TCP connection going away; such ranks served on forever
        gone = down.get_monitor_socket(zmq.EVENT_DISCONNECTED) if spec.dist_init == "env://" else None
        while True:
            if not down.poll(1000):
                if spec.dist_init != "env://" and os.getppid() != parent:  # frontend gone (non-Linux fallback of PDEATHSIG)
                    return 1
                if gone is not None and gone.poll(0):
                    print(f"rank {spec.rank}: the frontend closed its connection without a Shutdown; exiting",
                          file=sys.stderr, flush=True)
                    return 1
                continue
            payload = _verified(down.recv(), signer, spec.rank)
            if payload is None:
                continue
            msg = m.decode_to_worker(payload)
            if isinstance(msg, m.Shutdown):
                return 0
            if isinstance(msg, m.StepPlan):
                step = msg.step
                if step == exit_at:
                    os._exit(4)
                if spec.fault == f"raise_at_step:{step}":  # a failure the rank reports (an error in its step)
                    raise RuntimeError(f"injected fault at step {step}")
                t = time.perf_counter()
                out = runner.step(msg)
                if out is not None:
                    seq_index, logits, stats, load = out
                    if spec.fault == f"drop_output_at_step:{step}":  # a rank out of step: its last sequence missing
                        seq_index, logits = seq_index[:-1], logits[:-1]
                    send(m.StepOutput(step, spec.rank, seq_index, m.TensorBlob.from_tensor(logits),
                                      time.perf_counter() - t, stats,
                                      None if load is None else m.TensorBlob.from_tensor(load)))
                hb.step = step
            else:
                error, at = "", -1
                try:
                    at = runner.command(msg)
                except ValueError as exc:  # a command this runner refuses (every rank alike, from the same message)
                    # must not end the rank, and with it every request in flight: the running state serves on
                    print(f"rank {spec.rank}: refused {type(msg).__name__}: {exc}; serving on", file=sys.stderr,
                          flush=True)
                    error = str(exc)
                # the issuer waits for it (and for a PlacementCommand, the step it switches before)
                send(m.CommandDone(spec.rank, getattr(msg, "command_id", 0), error, at if isinstance(at, int) else -1))
    except Exception:  # report, then exit non-zero: the frontend fails the requests in flight
        send(m.WorkerError(spec.rank, step, traceback.format_exc()))
        return 1
    finally:
        hb.stop.set()
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
        if gone is not None:
            down.disable_monitor()
            gone.close()
        hb.join(timeout=2 * spec.heartbeat_s + 1)  # its socket must be closed before ctx.term() can return
        up.close()
        down.close()
        ctx.term()


FRONTEND_ENV = "MOE_SERVE_FRONTEND"


def external_spec(timeout_s: float = 600.0, key: bytes | None = None) -> WorkerSpec:
    """A rank started by torchrun: RANK etc. from its environment, the rest from the frontend.

    MOE_SERVE_FRONTEND=host:port names the frontend's `parallel.worker_endpoint`; rank r pulls its
    Configure message from port + 1 + r, torch.distributed rendezvous is env:// (MASTER_ADDR/PORT).
    The Configure must be signed with `key` (default: MOE_SERVE_CONTROL_KEY, which the frontend has too):
    a process that bound that port before the frontend could otherwise hand the rank any spec.
    """
    from moe_serve.distributed.groups import torchrun_env

    env, front = torchrun_env(), os.environ.get(FRONTEND_ENV)
    if env is None or not front:
        raise SystemExit(f"moe_serve.distributed.worker: set {SPEC_ENV} (started by the engine) or "
                         f"RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (torchrun) and {FRONTEND_ENV}=host:port")
    key = key or key_from_env()
    if key is None:
        raise SystemExit(f"moe_serve.distributed.worker: set {KEY_ENV} to the frontend's control key (hex)")
    signer, host, port = Signer(key), *front.rsplit(":", 1)
    rank = int(env["RANK"])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    secure(sock, key, f"tcp://{host}:{int(port) + 1 + rank}", server=False)
    sock.connect(f"tcp://{host}:{int(port) + 1 + rank}")
    deadline, payload = time.monotonic() + timeout_s, None
    try:
        while payload is None:  # frames that do not verify are dropped: wait on for the frontend's
            if not sock.poll(int(max(0.0, deadline - time.monotonic()) * 1000)):
                raise SystemExit(f"rank {rank}: no Configure from the frontend at {front} within {timeout_s:g} s")
            payload = _verified(sock.recv(), signer, rank)
        msg = m.decode_to_worker(payload)
    finally:
        sock.close()
        ctx.term()
    if not isinstance(msg, m.Configure):
        raise SystemExit(f"rank {rank}: expected Configure from the frontend, got {type(msg).__name__}")
    spec = WorkerSpec.from_json(msg.spec_json)
    spec.rank, spec.dist_init = rank, "env://"
    if spec.device.startswith("cuda"):
        spec.device = f"cuda:{env['LOCAL_RANK']}"
    return spec


def main() -> int:
    key = key_from_env(pop=True)  # a rank's child processes (a compiler, a tokenizer's) need not see it
    if SPEC_ENV in os.environ:
        _die_with_parent()
        # a terminal's Ctrl-C goes to the whole process group: the frontend handles it and stops the ranks
        # (Shutdown after the requests in flight, PDEATHSIG if it dies); a rank dying at once would fail them
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if key is None:
            raise SystemExit(f"moe_serve.distributed.worker: {KEY_ENV} is not set (the engine passes its control key)")
        return run_worker(WorkerSpec.from_json(os.environ[SPEC_ENV]), key)
    spec = external_spec(key=key)
    return run_worker(spec, key)


if __name__ == "__main__":
    sys.exit(main())
