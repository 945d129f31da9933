"""Where the control sockets live: ipc paths in a private temp dir, or TCP ports chosen at runtime.

Nothing here hard-codes a port: a TCP endpoint asks the kernel for a free one (bind to port 0),
an ipc endpoint is a path in a fresh `tempfile.mkdtemp` directory that the frontend removes on exit;
one left by a frontend that was killed is removed by the next one (`sweep_stale_dirs`).
"""
from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from dataclasses import dataclass


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the kernel's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_tcp_port_run(count: int, host: str = "127.0.0.1", tries: int = 200) -> int:
    """A port P with P .. P+count-1 all free a moment ago (a worker endpoint binds PORT and PORT+1+r).
    Drawn below Linux's ephemeral range (32768+), where outgoing connections take ports at random: a
    run taken from port 0's neighbours can be gone by the time it is bound."""
    import random

    for _ in range(tries):
        base = random.randrange(20000, 32768 - count)
        held = []
        try:
            for p in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(s)
                s.bind((host, p))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no run of {count} free TCP ports on {host} after {tries} tries")


PREFIX = "moe-serve-"
OWNER_FILE = "owner"  # in each temp dir: "<pid> <start time> <pid namespace>" of the frontend that made it


def _process_identity(pid: int | str = "self") -> str | None:
    """"<pid> <start time in clock ticks> <pid namespace>" of a live process of this pid namespace;
    None when there is no such process (or it is a zombie), or no /proc to ask (not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after "pid (comm)": the name may hold spaces
    except FileNotFoundError:
        return None
    if fields[0] in (b"Z", b"X"):  # killed, not yet reaped: gone for our purpose
        return None
    real_pid = os.getpid() if pid == "self" else int(pid)
    return f"{real_pid} {int(fields[19])} {os.readlink('/proc/self/ns/pid')}"


def sweep_stale_dirs() -> None:
    """Remove the temp dirs (ipc sockets, rendezvous file) of frontends that died without cleaning up.

    A frontend removes its own dir on a clean shutdown, but a SIGKILLed one (OOM killer, `kill -9`, a
    crashed container) cannot, and each crash would leave a `moe-serve-*` dir in the temp dir forever.
    So each new frontend removes those whose owner is gone. Only a dir that is certainly stale goes:
    a real directory (never a symlink) of this uid whose owner file names a process of this pid
    namespace that no longer exists, or whose pid now belongs to a process started at another time.
    A dir without an owner file (an older moe-serve, another tool, a frontend between mkdtemp and
    writing it), with an unreadable one, or from another pid namespace (a container sharing /tmp) is
    left alone. Races (another frontend sweeping, a dir vanishing) and permission errors are ignored.
    """
    try:
        own_ns = os.readlink("/proc/self/ns/pid")
        entries = list(os.scandir(tempfile.gettempdir()))
    except OSError:  # no /proc (not Linux) or an unreadable temp dir: nothing to judge by
        return
    for entry in entries:
        if not entry.name.startswith(PREFIX):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                continue
            fd = os.open(os.path.join(entry.path, OWNER_FILE), os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                pid, start, ns = f.read(256).decode().split()
            if ns != own_ns or _process_identity(int(pid)) == f"{int(pid)} {int(start)} {ns}":
                continue  # not ours to judge, or the owner is alive
        except (OSError, ValueError):  # gone, no owner file, not readable, half written
            continue
        shutil.rmtree(entry.path, ignore_errors=True)  # fd-based on Linux: never follows a symlink


@dataclass
class ControlEndpoints:
    """Addresses of one worker group's control sockets (frontend binds, ranks connect).

    up:    PULL on the frontend; every rank PUSHes Ready, Heartbeat, StepOutput, WorkerError to it.
    down:  one PUSH per rank on the frontend; rank r PULLs its step plans and commands from down[r].
    store: torch.distributed rendezvous (file:// in the temp dir, or tcp://host:port).
    """

    up: str
    down: list[str]
    store: str
    tmpdir: str | None = None

    @staticmethod
    def create(world_size: int, transport: str = "ipc", host: str = "127.0.0.1") -> "ControlEndpoints":
        if transport not in ("ipc", "tcp"):
            raise ValueError(f"parallel.control_transport must be ipc or tcp, got {transport!r}")
        sweep_stale_dirs()
        tmpdir = tempfile.mkdtemp(prefix=PREFIX)
        try:  # who owns the dir, for the sweep of a later frontend if this one is killed
            if owner := _process_identity():  # not Linux: no owner file, the dir is never swept
                with open(os.path.join(tmpdir, OWNER_FILE), "w") as f:
                    f.write(owner)
        except OSError:
            pass
        store = f"file://{os.path.join(tmpdir, 'dist-store')}"
        if transport == "ipc":
            return ControlEndpoints(
                up=f"ipc://{tmpdir}/up", down=[f"ipc://{tmpdir}/down-{r}" for r in range(world_size)],
                store=store, tmpdir=tmpdir,
            )
        # "*" : zmq binds a free port; the frontend reads the real address back (LAST_ENDPOINT)
        return ControlEndpoints(up=f"tcp://{host}:*", down=[f"tcp://{host}:*"] * world_size,
                                store=store, tmpdir=tmpdir)

    def cleanup(self) -> None:
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


def bind_sockets(ctx, endpoints: ControlEndpoints, external: bool, key: bytes):
    """The frontend's sockets: (PULL bound at endpoints.up, one PUSH per rank bound at endpoints.down[r]), tcp ones
    CURVE servers under the control `key` (signing.secure); a ValueError naming the option when an address cannot
    be bound (everything opened is closed, the context terminated, the temp dir removed)."""
    import zmq

    from moe_serve.distributed.signing import secure

    up = ctx.socket(zmq.PULL)
    up.setsockopt(zmq.LINGER, 0)
    down = []
    addr = endpoints.up
    try:
        secure(up, key, addr, server=True)
        up.bind(addr)
        for addr in endpoints.down:
            s = ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 0)
            down.append(s)
            secure(s, key, addr, server=True)
            s.bind(addr)
    except zmq.ZMQError as exc:  # e.g. a port of parallel.worker_endpoint (PORT, PORT+1+r) is taken
        for s in [up, *down]:
            s.close()
        ctx.term()
        endpoints.cleanup()
        field = "parallel.worker_endpoint" if external else "parallel.control_transport"
        raise ValueError(f"{field}: cannot bind {addr} ({zmq.strerror(exc.errno)})") from exc
    return up, down
