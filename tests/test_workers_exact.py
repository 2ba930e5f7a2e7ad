"""``server.workers = 2``: limits and credits are exact across the workers
(real ``triogate serve`` processes, real HTTP, one data directory).

A key limited to 10 a minute gets exactly 10 whether its requests come over
one keep-alive connection (one worker) or over fresh connections (the kernel
spreads them over both); a route limit by key, credits, the undo of a refusal
after admission, a damaged shared table at start, a worker SIGKILLed
under load, balances spent with one worker not coming back from a stale
table, a key moved off its plan, and workers exiting with their killed
supervisor.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
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
from triogate.storage.limits_file import limits_path


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

[storage]
flush_interval_seconds = 0.2

[upstreams.echo]
targets = ["{upstream}"]

[[routes]]
name = "limited"
path = "/limited/{{rest:path}}"
upstream = "echo"
[routes.plugins]
key-auth = {{}}
rate-limit = {{ limit = 10, period_seconds = 60, by = "key" }}

[[routes]]
name = "gate"
path = "/gate/{{rest:path}}"
upstream = "echo"
[routes.plugins]
key-auth = {{}}
rate-limit = {{ limit = 3, period_seconds = 60, by = "route" }}

[[routes]]
name = "open"
path = "/{{rest:path}}"
upstream = "echo"
[routes.plugins]
key-auth = {{}}
"""
    )
    return path


def _key(tmp_path: Path, *options: str) -> dict[str, str]:
    created = run_cli(
        "keys", "create", "--data-dir", str(tmp_path / "data"), "--name", "w",
        "--owner", "o", "--json", *options,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    key: dict[str, str] = json.loads(created.stdout)
    return key


def _fresh(port: int, path: str, key: str, n: int) -> list[int]:
    """``n`` requests, each on a new connection (spread over both workers)."""
    statuses = []
    for _ in range(n):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            statuses.append(client.get(path, headers={"x-api-key": key}).status_code)
    return statuses


def _kept(port: int, path: str, key: str, n: int) -> list[int]:
    """``n`` requests over one keep-alive connection (one worker)."""
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        return [client.get(path, headers={"x-api-key": key}).status_code for _ in range(n)]


def _stored(tmp_path: Path, key_id: str) -> tuple[int, int | None]:
    """The key's flushed request count and credit balance (after a stop)."""

    async def read() -> tuple[int, int | None]:
        cfg = parse_config({"server": {"data_dir": str(tmp_path / "data")}}, environ={})
        async with open_gateway(cfg) as gw:
            credits = gw.keys.get(key_id).credits
            return gw.keys.usage(key_id).requests, None if credits is None else credits.remaining

    return trio.run(read)


def test_limits_credits_and_undo_are_exact_across_two_workers(
    tmp_path: Path, upstream: str
) -> None:
    (port,) = free_ports(1)
    config = _config(tmp_path, upstream, port)
    kept = _key(tmp_path, "--rate-limit", "minute=10/60")
    fresh = _key(tmp_path, "--rate-limit", "minute=10/60")
    by_route = _key(tmp_path)
    metered = _key(tmp_path, "--credits", "12")
    undone = _key(tmp_path, "--rate-limit", "minute=5/60", "--credits", "100")
    with serving(config) as proc:
        wait_for_workers(proc)
        # One connection, one worker: the whole limit, not a share of it.
        assert _kept(port, "/x", kept["key"], 25) == [200] * 10 + [429] * 15
        # Fresh connections over both workers: exactly the limit together.
        assert _fresh(port, "/x", fresh["key"], 25) == [200] * 10 + [429] * 15
        # A route's limit by key, likewise.
        assert _fresh(port, "/limited/x", by_route["key"], 25) == [200] * 10 + [429] * 15
        # Credits: exactly 12, then refused.
        assert _fresh(port, "/x", metered["key"], 20) == [200] * 12 + [429] * 8
        # Undo: the route's limit (3 for everyone) refuses after the key's
        # own limit admitted; each refusal gives the key's slot and credit back.
        assert _fresh(port, "/gate/x", undone["key"], 6) == [200] * 3 + [429] * 3
        assert _fresh(port, "/x", undone["key"], 4) == [200] * 2 + [429] * 2
        assert proc.stop(signal.SIGTERM) == 0
    assert _stored(tmp_path, metered["id"]) == (20, 0)
    # 5 admitted by the key's own limit, of which 3 served on /gate and 2 on /.
    assert _stored(tmp_path, undone["id"]) == (10, 95)


def test_a_damaged_shared_table_is_recreated_at_start(tmp_path: Path, upstream: str) -> None:
    (port,) = free_ports(1)
    config = _config(tmp_path, upstream, port)
    key = _key(tmp_path, "--rate-limit", "minute=3/60")
    shared = limits_path(tmp_path / "data")
    shared.mkdir()
    (shared / "data.mdb").write_bytes(b"not an LMDB file" * 1000)
    # The doctor warns about it but does not call the data directory damaged.
    doctor = run_cli("doctor", "--data-dir", str(tmp_path / "data"))
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "warning  limits:" in doctor.stdout and "the next start recreates it" in doctor.stdout
    with serving(config) as proc:
        wait_for_workers(proc)
        assert _fresh(port, "/x", key["key"], 8) == [200] * 3 + [429] * 5
        assert proc.stop(signal.SIGTERM) == 0
    assert "starting it afresh" in proc.stderr()
    doctor = run_cli("doctor", "--data-dir", str(tmp_path / "data"))
    assert doctor.returncode == 0 and "ok       limits:" in doctor.stdout, doctor.stdout


def _workers(supervisor: int) -> list[int]:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [int(pid) for pid in children]


def test_a_worker_killed_under_load_never_spends_credits_twice(
    tmp_path: Path, upstream: str
) -> None:
    (port,) = free_ports(1)
    config = _config(tmp_path, upstream, port)
    key = _key(tmp_path, "--credits", "30")
    ok = failed = refused = 0
    with serving(config) as proc:
        wait_for_workers(proc)
        victim = _workers(proc.proc.pid)[0]
        for i in range(80):  # bounded: 30 credits, a few connection errors
            if i == 12:
                os.kill(victim, signal.SIGKILL)
            try:
                status = _fresh(port, "/x", key["key"], 1)[0]
            except httpx.TransportError:
                failed += 1  # the connection the killed worker held
                continue
            ok += status == 200
            refused += status == 429
        assert proc.stop(signal.SIGTERM) == 0
    # Never more than the balance; only a request in flight in the killed
    # worker may have spent a credit and gone unanswered.
    assert 30 - failed <= ok <= 30, (ok, failed, refused)
    assert refused == 80 - ok - failed
    assert _stored(tmp_path, key["id"])[1] == 0


def _with_workers(path: Path, workers: int) -> Path:
    path.write_text(re.sub(r"workers = \d+", f"workers = {workers}", path.read_text()))
    return path


def test_credits_spent_with_one_worker_do_not_come_back_with_two(
    tmp_path: Path, upstream: str
) -> None:
    """Two workers leave the shared table holding 5; one worker (no table)
    spends those 5; two workers again must not find the stale 5: a start
    with ``workers = 1`` discards the table."""
    (port,) = free_ports(1)
    config = _config(tmp_path, upstream, port)
    key = _key(tmp_path, "--credits", "10")
    with serving(config) as proc:
        wait_for_workers(proc)
        assert _fresh(port, "/x", key["key"], 5) == [200] * 5
        assert proc.stop(signal.SIGTERM) == 0
    assert _stored(tmp_path, key["id"]) == (5, 5)
    with serving(_with_workers(config, 1)) as proc:
        assert not limits_path(tmp_path / "data").exists()
        assert _fresh(port, "/x", key["key"], 5) == [200] * 5
        assert proc.stop(signal.SIGTERM) == 0
    assert _stored(tmp_path, key["id"]) == (10, 0)
    with serving(_with_workers(config, 2)) as proc:
        wait_for_workers(proc)
        statuses = _fresh(port, "/x", key["key"], 5)
        assert proc.stop(signal.SIGTERM) == 0
    assert statuses == [429] * 5
    assert _stored(tmp_path, key["id"]) == (15, 0)  # refusals count as requests


def test_a_key_taken_off_its_plan_gets_its_own_credits(tmp_path: Path, upstream: str) -> None:
    (port,) = free_ports(1)
    config = _config(tmp_path, upstream, port)
    with serving(config) as proc:
        wait_for_workers(proc)
        with httpx.Client(base_url=proc.url, timeout=10) as admin:
            r = admin.post("/setup", json={"name": "root", "email": "root@example.com"})
            auth = {"Authorization": f"Bearer {r.json()['key']}"}
            plan = admin.post(
                "/plans", json={"name": "p", "credits": {"remaining": 2}}, headers=auth
            )
            body = {"name": "k", "owner": "o", "plan_id": plan.json()["id"]}
            key = admin.post("/keys", json=body, headers=auth).json()
            assert _fresh(port, "/x", key["key"], 3) == [200, 200, 429]
            body = {"plan_id": None, "credits": {"remaining": 1000}}
            r = admin.patch(f"/keys/{key['id']}", json=body, headers=auth)
            assert r.json()["credits"]["remaining"] == 1000
            statuses = _fresh(port, "/x", key["key"], 3)
        assert proc.stop(signal.SIGTERM) == 0
    assert statuses == [200] * 3


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def test_workers_exit_when_their_supervisor_is_killed(tmp_path: Path, upstream: str) -> None:
    (port,) = free_ports(1)
    config = _config(tmp_path, upstream, port)
    with serving(config) as proc:
        wait_for_workers(proc)
        workers = _workers(proc.proc.pid)
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        proc.proc.kill()  # SIGKILL: no chance to stop them itself
        proc.proc.wait(timeout=10)
        deadline = time.monotonic() + 60
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers), "workers outlived their supervisor"
