"""Every distributed test runs under a hard wall-clock limit (SIGALRM), so nothing can hang CI."""
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
