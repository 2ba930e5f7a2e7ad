"""``server.workers = 2`` and a config reload: whichever way it comes (SIGHUP to
the supervisor, or ``POST /config/reload`` on worker 0's admin API), every
worker serves the new file."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers_process import (
    ServeProcess,
    free_ports,
    serving,
    threaded_upstream,
    wait_for_workers,
)
from tests.test_reload import config_doc, route, write_doc


@pytest.fixture
def upstream() -> Iterator[str]:
    with threaded_upstream() as url:
        yield url


def _write(path: Path, tmp_path: Path, upstream: str, port: int, routes: list[str]) -> None:
    doc = config_doc(
        tmp_path / "data",
        {"echo": upstream},
        [route(name, f"/{name}/{{rest:path}}", "echo") for name in routes],
        server={"proxy_listen": f"127.0.0.1:{port}", "workers": 2},
    )
    write_doc(path, doc)


def _wait_for_workers(proc: ServeProcess) -> str:
    """Both workers listening; the admin URL (worker 0's)."""
    wait_for_workers(proc)
    return proc.url  # serving() waited for the admin line


def _statuses(port: int, path: str, count: int = 30) -> set[int]:
    """Status codes over fresh connections: the kernel spreads them over both
    workers, so a worker still on the old config shows up as a 404."""
    seen: set[int] = set()
    for _ in range(count):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            seen.add(client.get(path).status_code)
    return seen


def _until_all_serve(port: int, path: str) -> set[int]:
    # A reload is asynchronous in the other workers: wait (bounded) for it.
    deadline = time.monotonic() + 15
    seen = _statuses(port, path)
    while seen != {200} and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = _statuses(port, path)
    return seen


def test_a_reload_through_the_admin_api_reaches_every_worker(tmp_path: Path, upstream: str) -> None:
    (port,) = free_ports(1)
    config = tmp_path / "workers.toml"
    _write(config, tmp_path, upstream, port, ["a"])
    with serving(config) as proc:
        admin = _wait_for_workers(proc)
        setup = httpx.post(f"{admin}/setup", json={"name": "ops", "email": "ops@example.com"})
        assert setup.status_code == 201, setup.text
        token = setup.json()["key"]
        assert _statuses(port, "/a/x") == {200}
        assert _statuses(port, "/b/x") == {404}

        _write(config, tmp_path, upstream, port, ["a", "b"])
        reload = httpx.post(
            f"{admin}/config/reload", headers={"authorization": f"Bearer {token}"}, timeout=10
        )
        assert reload.status_code == 200, reload.text
        assert _until_all_serve(port, "/b/x") == {200}

        # SIGHUP to the supervisor: forwarded to both workers.
        _write(config, tmp_path, upstream, port, ["a", "b", "c"])
        proc.proc.send_signal(signal.SIGHUP)
        assert _until_all_serve(port, "/c/x") == {200}
        assert proc.stop(signal.SIGTERM) == 0
