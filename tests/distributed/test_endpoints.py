"""Temp dirs of killed frontends are swept by the next frontend; nothing else is touched.

Every test points tempfile at a dir of its own tmp_path, so no other user's (or test's) /tmp is looked at.
"""
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from moe_serve.distributed.endpoints import ControlEndpoints

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/ns/pid"), reason="the sweep needs Linux's /proc")
OWNER_FILE = "owner"


@pytest.fixture
def tmp(tmp_path, monkeypatch):
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return tmp_path / "tmp"


def _identity(pid):
    """What a frontend writes in its owner file: pid, start time (field 22 of /proc/PID/stat), pid namespace."""
    with open(f"/proc/{pid}/stat") as f:
        start = f.read().rsplit(")", 1)[1].split()[19]
    return f"{pid} {start} {os.readlink('/proc/self/ns/pid')}"


def _stale(tmp, name, owner):
    d = tmp / name
    d.mkdir(mode=0o700)
    (d / "up").write_text("")  # stands for an ipc socket file
    if owner is not None:
        (d / OWNER_FILE).write_text(owner)
    return d


def _dead_identity():
    """The identity a frontend that has since died wrote: a real process's, taken alive, then killed."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ident = _identity(p.pid)
    p.kill()
    p.wait()
    return ident


def _create_and_cleanup():
    ep = ControlEndpoints.create(2)
    assert os.path.isfile(os.path.join(ep.tmpdir, OWNER_FILE))  # the new dir is marked: a later sweep can judge it
    ep.cleanup()


def test_dir_of_dead_owner_is_removed(tmp):
    dead = _stale(tmp, "moe-serve-dead", _dead_identity())
    pid, start, ns = _identity(os.getpid()).split()
    reused = _stale(tmp, "moe-serve-reused", f"{pid} {int(start) - 1} {ns}")  # our pid, another process's start
    z = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        zombie = _stale(tmp, "moe-serve-zombie", _identity(z.pid))
        z.kill()  # killed, not yet reaped by its parent (this process)
        while open(f"/proc/{z.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)
        _create_and_cleanup()
    finally:
        z.wait()
    assert not dead.exists() and not reused.exists() and not zombie.exists()
    assert list(tmp.iterdir()) == []


def test_dir_of_live_owner_is_kept(tmp):
    me = _stale(tmp, "moe-serve-me", _identity(os.getpid()))
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        child = _stale(tmp, "moe-serve-child", _identity(p.pid))
        _create_and_cleanup()
        assert (me / "up").exists() and (child / "up").exists()
    finally:
        p.kill()
        p.wait()


def test_dir_without_owner_file_or_from_elsewhere_is_kept(tmp):
    pid, start, _ = _dead_identity().split()
    kept = [
        _stale(tmp, "moe-serve-old", None),  # an older moe-serve, or another tool
        _stale(tmp, "moe-serve-half", ""),  # a frontend between mkdtemp and writing its owner file
        _stale(tmp, "moe-serve-garbled", "not a pid\n"),
        _stale(tmp, "moe-serve-ns", f"{pid} {start} pid:[1]"),  # another pid namespace (a container sharing /tmp)
    ]
    _create_and_cleanup()
    assert all((d / "up").exists() for d in kept)


def test_symlinks_are_not_followed(tmp_path, tmp):
    dead = _dead_identity()
    outside = tmp_path / "outside"
    outside.mkdir()
    target = _stale(outside, "target", dead)  # would be removed if the sweep followed the link
    (tmp / "moe-serve-x").symlink_to(target, target_is_directory=True)
    marker = outside / "marker"
    marker.write_text(dead)
    linked = _stale(tmp, "moe-serve-linked-owner", None)
    (linked / OWNER_FILE).symlink_to(marker)  # an owner file that is a link is not trusted
    _create_and_cleanup()
    assert (tmp / "moe-serve-x").is_symlink() and (target / "up").exists() and (target / OWNER_FILE).exists()
    assert (linked / "up").exists()


FRONTEND = textwrap.dedent("""
    import time, zmq
    from moe_serve.distributed.endpoints import ControlEndpoints
    ep = ControlEndpoints.create(2, "ipc")
    ctx = zmq.Context()
    for addr, kind in [(ep.up, zmq.PULL)] + [(d, zmq.PUSH) for d in ep.down]:
        ctx.socket(kind).bind(addr)  # as WorkerGroup binds them: the socket files exist
    print(ep.tmpdir, flush=True)
    time.sleep(60)
""")


@pytest.mark.limit(30)
def test_killed_frontend_dir_is_swept_by_the_next(tmp):
    env = {**os.environ, "TMPDIR": str(tmp)}
    p = subprocess.Popen([sys.executable, "-c", FRONTEND], stdout=subprocess.PIPE, text=True, env=env)
    try:
        left = p.stdout.readline().strip()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert os.path.dirname(left) == str(tmp)
    assert sorted(os.listdir(left)) == ["down-0", "down-1", "owner", "up"]  # SIGKILL: nobody cleaned up
    ep = ControlEndpoints.create(2)
    try:
        assert not os.path.exists(left)
        assert os.listdir(tmp) == [os.path.basename(ep.tmpdir)]
    finally:
        ep.cleanup()
