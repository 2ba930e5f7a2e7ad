"""``server.workers = 2``: two real gateway processes on one LMDB, one port."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.helpers_process import (
    free_ports,
    run_cli,
    serving,
    threaded_upstream,
    wait_for_workers,
)
from triogate.config import parse_config
from triogate.runtime.gateway import open_gateway


@pytest.fixture
def upstream() -> Iterator[str]:
    with threaded_upstream() as url:
        yield url


def _config(tmp_path: Path, upstream: str, port: int) -> Path:
    path = tmp_path / "workers.toml"
    path.write_text(
        f"""
[server]
proxy_listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:0"
data_dir = "{tmp_path / "data"}"
workers = 2
shutdown_grace_seconds = 5

[upstreams.echo]
targets = ["{upstream}"]

[[routes]]
name = "echo"
path = "/{{rest:path}}"
upstream = "echo"
[routes.plugins]
key-auth = {{}}
"""
    )
    return path


def test_two_workers_share_the_port_the_store_and_the_limit(tmp_path: Path, upstream: str) -> None:
    (port,) = free_ports(1)
    config = _config(tmp_path, upstream, port)
    created = run_cli(
        "keys", "create", "--data-dir", str(tmp_path / "data"), "--name", "w",
        "--owner", "o", "--rate-limit", "minute=10/60", "--json",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    statuses: list[int] = []
    with serving(config) as proc:
        wait_for_workers(proc)  # both up before the load
        # New connections each time, so the kernel spreads them over both.
        for _ in range(40):
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                r = client.get("/x", headers={"x-api-key": key["key"]})
                statuses.append(r.status_code)
        assert proc.stop(signal.SIGTERM) == 0
    # The workers decide in one shared table: exactly the key's 10.
    assert statuses == [200] * 10 + [429] * 30, statuses

    async def usage() -> int:
        cfg = parse_config({"server": {"data_dir": str(tmp_path / "data")}}, environ={})
        async with open_gateway(cfg) as gw:
            return gw.keys.usage(key["id"]).requests

    # Both workers flushed their counts into the one store on SIGTERM.
    assert trio.run(usage) == 40


def test_several_workers_need_a_fixed_port(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nproxy_listen = "127.0.0.1:0"\nworkers = 2\n')
    result = run_cli("check-config", str(path))
    assert result.returncode == 1
    assert "server.workers: several workers share one proxy port" in result.stderr
