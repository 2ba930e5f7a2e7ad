"""Credit operations against concurrent spending, through the real
``triogate serve`` (one worker, and ``server.workers = 2``), real HTTP and a
real LMDB: 20 concurrent decrements and 100 proxied requests leave exactly
the right balance; validate and the proxy's headers agree; the CLI's
``keys credits``."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.helpers_process import free_ports, run_cli, serving, threaded_upstream
from triogate.config import parse_config
from triogate.runtime.gateway import open_gateway

START = 1000
DECREMENTS = 20
AMOUNT = 7
REQUESTS = 100


@pytest.fixture
def upstream() -> Iterator[str]:
    with threaded_upstream() as url:
        yield url


def _config(tmp_path: Path, upstream: str, port: int, workers: int) -> Path:
    path = tmp_path / "credits.toml"
    path.write_text(
        f"""
[server]
proxy_listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:0"
data_dir = "{tmp_path / "data"}"
workers = {workers}
shutdown_grace_seconds = 5

[storage]
flush_interval_seconds = 0.2

[upstreams.echo]
targets = ["{upstream}"]

[[routes]]
name = "open"
path = "/{{rest:path}}"
upstream = "echo"
[routes.plugins]
key-auth = {{}}
"""
    )
    return path


def _wait_workers(lines: list[str], workers: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if sum("proxy listening" in line for line in lines) >= workers:
            return
        time.sleep(0.05)
    raise AssertionError(lines)


def _stored_balance(tmp_path: Path, key_id: str) -> int | None:
    async def read() -> int | None:
        cfg = parse_config({"server": {"data_dir": str(tmp_path / "data")}}, environ={})
        async with open_gateway(cfg) as gw:
            return gw.keys.usage(key_id).credits_remaining

    return trio.run(read)


@pytest.mark.parametrize("workers", [1, 2])
def test_concurrent_decrements_and_requests_leave_the_exact_balance(
    tmp_path: Path, upstream: str, workers: int
) -> None:
    (port,) = free_ports(1)
    config = _config(tmp_path, upstream, port, workers)
    proxy_url = f"http://127.0.0.1:{port}"
    with serving(config) as proc, proc.client() as admin_client:
        _wait_workers(proc.stdout_lines, workers)
        r = admin_client.post("/setup", json={"name": "root", "email": "root@example.com"})
        assert r.status_code == 201, r.text
        admin = {"authorization": f"Bearer {r.json()['key']}"}
        r = admin_client.post(
            "/keys",
            json={
                "name": "m",
                "owner": "o",
                "credits": {"remaining": START},
                # A year's limit: nothing of it comes back while the test runs.
                "rate_limits": [{"name": "year", "limit": 1000, "period_seconds": 31_536_000}],
            },
            headers=admin,
        )
        assert r.status_code == 201, r.text
        key_id, key = r.json()["id"], r.json()["key"]
        base = proc.url

        def decrement(_: int) -> int:
            with httpx.Client(base_url=base, timeout=30) as c:
                body = {"op": "decrement", "amount": AMOUNT}
                return c.post(f"/keys/{key_id}/credits", json=body, headers=admin).status_code

        def request(_: int) -> int:
            # A fresh connection each: with two workers the kernel spreads them.
            with httpx.Client(base_url=proxy_url, timeout=30) as c:
                return c.get("/x", headers={"x-api-key": key}).status_code

        jobs: list[Any] = [decrement] * DECREMENTS + [request] * REQUESTS
        jobs = [jobs[i] for i in sorted(range(len(jobs)), key=lambda i: (i * 37) % len(jobs))]
        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = list(pool.map(lambda job: job(0), jobs))
        assert statuses == [200] * len(jobs)
        expected = START - DECREMENTS * AMOUNT - REQUESTS
        doc = admin_client.post("/keys/validate", json={"key": key}, headers=admin).json()
        assert doc["credits_remaining"] == expected
        assert doc["rate_limits"][0]["remaining"] == 1000 - REQUESTS
        # The next request says one fewer, whichever worker serves it.
        with httpx.Client(base_url=proxy_url, timeout=10) as c:
            r = c.get("/x", headers={"x-api-key": key})
        assert r.status_code == 200 and r.headers["x-credits-remaining"] == str(expected - 1)
        assert r.headers["x-ratelimit-remaining"] == str(1000 - REQUESTS - 1)
        r = admin_client.post(
            f"/keys/{key_id}/credits", json={"op": "decrement", "amount": START}, headers=admin
        )
        assert r.status_code == 409 and r.json()["code"] == "INSUFFICIENT_CREDITS"
        assert proc.stop(signal.SIGTERM) == 0
    assert _stored_balance(tmp_path, key_id) == expected - 1


def test_cli_credit_operations(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    created = run_cli(
        "keys", "create", "--data-dir", data, "--name", "m", "--owner", "o",
        "--credits", "10", "--json",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    key_id = json.loads(created.stdout)["id"]
    done = run_cli("keys", "credits", key_id, "decrement", "3", "--data-dir", data)
    assert done.returncode == 0, done.stderr
    assert "10 -> 7 credits" in done.stdout
    done = run_cli("keys", "credits", key_id, "increment", "5", "--data-dir", data, "--json")
    assert json.loads(done.stdout)["credits_remaining"] == 12
    done = run_cli("keys", "credits", key_id, "decrement", "13", "--data-dir", data)
    assert done.returncode == 1 and "INSUFFICIENT_CREDITS" in done.stderr
    done = run_cli("keys", "credits", key_id, "increment", "0", "--data-dir", data)
    assert done.returncode == 1 and "VALIDATION_ERROR" in done.stderr
    done = run_cli("keys", "credits", key_id, "triple", "2", "--data-dir", data)
    assert done.returncode == 2
    assert _stored_balance(tmp_path, key_id) == 12

    ident = run_cli(
        "identities", "create", "--data-dir", data, "--external-id", "acme",
        "--credits", "4", "--json",
    )  # fmt: skip
    assert ident.returncode == 0, ident.stderr
    ident_id = json.loads(ident.stdout)["id"]
    done = run_cli("identities", "credits", ident_id, "set", "9", "--data-dir", data, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["previous_remaining"] == 4
    assert json.loads(done.stdout)["credits_remaining"] == 9
