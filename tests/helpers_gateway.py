"""What tests over a running gateway (``triogate.testing.open_harness`` or the
``running`` fixture) keep needing: the first admin, keys made through the
admin API, the bearer header, and the check that an answer is the gateway's
own problem+json error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.exceptions import config_error
from triogate.errors import ConfigError
from triogate.testing import FakeUpstream, Harness, open_harness

__all__ = [
    "PROBLEM_JSON",
    "assert_problem",
    "bearer",
    "create_key",
    "refused_config",
    "setup_admin",
]

PROBLEM_JSON = "application/problem+json"


async def refused_config(tmp_path: Path, **harness_kw: Any) -> ConfigError:
    """Open a harness (``open_harness`` arguments) that must refuse to start;
    the ConfigError it raised. Nothing reached the upstream."""
    upstream = FakeUpstream()
    with pytest.raises((ConfigError, BaseExceptionGroup)) as info:
        async with open_harness(tmp_path, upstream=upstream, **harness_kw):
            pytest.fail("the gateway started with an invalid config")
    assert upstream.requests == []
    return config_error(info.value)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def setup_admin(h: Harness) -> dict[str, str]:
    """``POST /setup``: the super_admin's headers."""
    r = await h.admin.post("/setup", json={"name": "root", "email": "root@example.com"})
    assert r.status_code == 201, r.text
    return bearer(r.json()["key"])


async def create_key(h: Harness, admin: dict[str, str], **fields: Any) -> tuple[str, str]:
    """A key made through the admin API: (id, plaintext)."""
    body = {"name": "k", "owner": "o", "scopes": [], **fields}
    r = await h.admin.post("/keys", json=body, headers=admin)
    assert r.status_code == 201, r.text
    doc = r.json()
    return doc["id"], doc["key"]


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """``r`` is the gateway's own RFC 9457 problem with ``code`` (not an
    upstream's answer passed through); returns its body."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith(PROBLEM_JSON), r.headers
    body: dict[str, Any] = r.json()
    assert body["type"] == "about:blank"
    assert body["status"] == status
    assert body["code"] == code, body
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert isinstance(body["request_id"], str) and body["request_id"]
    assert "Traceback" not in r.text
    return body
