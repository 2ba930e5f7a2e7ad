"""``hypercorn triogate.asgi:app`` on its own: the ASGI lifespan opens the
gateway from TRIOGATE_CONFIG, and requests go through the same pipeline."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers_process import clean_env, free_ports
from triogate.dataplane.sharedlimits import SharedLimits
from triogate.runtime.standalone import open_standalone
from triogate.storage.limits_file import limits_path


def _wait(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


def test_hypercorn_serves_the_pipeline(tmp_path: Path) -> None:
    echo_port, port = free_ports(2)
    config = tmp_path / "c.toml"
    config.write_text(
        f"""
[server]
data_dir = "{tmp_path / "data"}"
[log]
access_log = ""
[upstreams.echo]
targets = ["http://127.0.0.1:{echo_port}"]
[[routes]]
name = "echo"
path = "/e/{{rest:path}}"
upstream = "echo"
upstream_path = "/{{rest}}"
"""
    )
    echo = subprocess.Popen([sys.executable, "-m", "triogate.runtime.echo", str(echo_port)])
    hyper = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hypercorn",
            "--worker-class",
            "trio",
            "-b",
            f"127.0.0.1:{port}",
            "triogate.asgi:app",
        ],
        env=clean_env({"TRIOGATE_CONFIG": str(config)}),
        stderr=subprocess.PIPE,
    )
    try:
        _wait(f"http://127.0.0.1:{port}/nowhere")
        r = httpx.get(f"http://127.0.0.1:{port}/e/hello?x=1", timeout=5)
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["path"], body["query"]) == ("/hello", "x=1")
        assert body["headers"]["x-forwarded-for"] == "127.0.0.1"
        r = httpx.get(f"http://127.0.0.1:{port}/nowhere", timeout=5)
        assert r.status_code == 404
        assert r.json()["code"] == "ROUTE_NOT_FOUND"
    finally:
        hyper.terminate()
        echo.terminate()
        hyper.wait(10)
        echo.wait(10)
    assert hyper.stderr is not None
    assert b"Traceback" not in hyper.stderr.read()


async def test_the_standalone_app_discards_the_workers_shared_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One process decides: balances it spends would be stale in the table,
    so a later ``serve`` with workers must not find it."""
    data = tmp_path / "data"
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\ndata_dir = "{data}"\n[log]\naccess_log = ""\n')
    monkeypatch.setenv("TRIOGATE_CONFIG", str(config))
    async with open_standalone():  # the data directory, made
        pass
    SharedLimits.open(data).close()
    assert limits_path(data).exists()
    async with open_standalone():
        assert not limits_path(data).exists()
