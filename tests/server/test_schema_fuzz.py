"""Schema fuzz: schemathesis generates requests from the server's own OpenAPI spec; none may get a 5xx.

Run against `strict_server`, whose 0.3 s request timeout keeps every generated generation short, with
a bounded example count per operation so the whole fuzz stays well under a minute.
"""
from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the test extras")
from hypothesis import HealthCheck, settings  # noqa: E402

from tests.server.conftest import API_KEY  # noqa: E402


from hypothesis import given  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def test_no_server_errors(strict_server):
    """Every operation of the spec, fuzzed with valid (positive) and invalid (negative) requests; the pytest plugin of schemathesis is not used (it needs
    pytest internals this pytest version lacks), the operations' Hypothesis strategies are."""
    schema = schemathesis.openapi.from_url(strict_server.url + "/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {f"{o.method.upper()} {o.path}" for o in operations} >= {
        "POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "POST /v1/traces/start"}
    seen: dict[int, int] = {}
    modes = [(schemathesis.GenerationMode.POSITIVE, 20), (schemathesis.GenerationMode.NEGATIVE, 12)]
    for (mode, examples), op in [(m, o) for m in modes for o in operations]:
        @given(case=op.as_strategy(mode))
        @settings(FUZZ, max_examples=examples)
        def fuzz(case):
            response = case.call(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500 or response.status_code == 504, (
                f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}\nbody: {case.body!r}")
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        try:
            fuzz()
        except Unsatisfiable:  # an operation without inputs has no invalid request to make
            assert mode == schemathesis.GenerationMode.NEGATIVE, f"{op.method} {op.path}"
    print("status counts:", seen)
    assert seen.get(200, 0) > 0 and seen.get(400, 0) > 0, seen  # both valid and invalid requests were made
