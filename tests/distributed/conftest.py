"""Every distributed test runs under a hard wall-clock limit (SIGALRM), so nothing can hang CI; ranks started as
torchrun starts them, and their frontend, share a control key from the environment, as a deployment's would."""
import signal

import pytest

LIMIT_S = 90


@pytest.fixture(autouse=True)
def hard_timeout(request):
    limit = getattr(request.node.get_closest_marker("limit"), "args", [LIMIT_S])[0]

    def fire(signum, frame):
        raise TimeoutError(f"{request.node.name} ran past its hard limit of {limit} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(limit)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def pytest_configure(config):
    config.addinivalue_line("markers", "limit(seconds): this test's hard wall-clock limit (default 90 s)")


@pytest.fixture(autouse=True)
def control_key(monkeypatch):
    """MOE_SERVE_CONTROL_KEY, fresh per test: the frontend of parallel.worker_endpoint and the ranks it waits for
    (child processes inherit it) sign their frames with it. Ranks the frontend starts get a key of their own."""
    from moe_serve.distributed.signing import KEY_ENV, new_key

    key = new_key()
    monkeypatch.setenv(KEY_ENV, key.hex())
    return key
