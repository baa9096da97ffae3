"""Schemathesis against the live admin API, driven by the OpenAPI description it serves.

Requests are generated from ``/api/v1/openapi.json`` (valid and invalid bodies, odd path
parameters) and sent to a real ``l4lb run`` whose admin API requires a bearer token. Every
answer must match the description (status, content type, schema) and no request may cause a
server error, a crash, or a traceback; afterwards the process still proxies.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

from l4lb._testbase import L4lbProcess, NamedServer, connect_name  # noqa: E402
from l4lb.admin import OPENAPI  # noqa: E402

TOKEN = "5b0f2a1c9e8d7f6a5b4c3d2e1f0a9b8c"


@pytest.fixture(scope="module")
def admin_lb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[L4lbProcess]:
    token_file = Path(tmp_path_factory.mktemp("admin")) / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    with NamedServer("b0") as b0, NamedServer("b1") as b1:
        cfg: dict[str, Any] = {
            "admin": {"listen": "127.0.0.1:0", "token_file": str(token_file)},
            "dataplane": {"workers": 1},
            "services": [
                {
                    "name": "web",
                    "listen": "127.0.0.1:0",
                    "backends": [{"address": b0.address}, {"address": b1.address}],
                }
            ],
        }
        with L4lbProcess(cfg) as lb:
            yield lb
            assert lb.running, lb.stderr_text()
            assert connect_name(lb.service_address("web")) in {"b0", "b1"}
            assert lb.http_get("/healthz")[0] == 200
        assert "Traceback" not in lb.stderr_text(), lb.stderr_text()
        assert TOKEN not in lb.stderr_text()


_METHODS = ("get", "post", "put", "patch", "delete")
_CASES = [
    (f"{method.upper()} {path}", mode)
    for path, item in OPENAPI["paths"].items()
    for method in item
    if method in _METHODS
    # Only a body can be invalid: every string is a valid path parameter.
    for mode in (("positive", "negative") if method == "post" else ("positive",))
]


@pytest.mark.parametrize(("label", "mode"), _CASES)
def test_admin_api_answers_as_described(admin_lb: L4lbProcess, label: str, mode: str) -> None:
    base_url = f"http://{admin_lb.admin}"
    schema = schemathesis.openapi.from_url(f"{base_url}/api/v1/openapi.json")
    operation = schema.find_operation_by_label(label)
    assert operation is not None, label
    strategy = operation.as_strategy(generation_mode=GenerationMode(mode))

    @given(case=strategy)
    @settings(
        max_examples=40,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def check(case: Any) -> None:
        case.call_and_validate(
            base_url=base_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
        )

    check()
