"""The front doors other than the native proxy listener hold the same lines:

* the hypercorn proxy door (``triogate serve --server hypercorn``) enforces
  ``body_timeout_seconds`` per wait for the next piece of a body and
  ``body_deadline_seconds`` for the whole body (408 ``REQUEST_TIMEOUT``),
  as the native listener does; before, a client dripping a byte at a time
  held an upstream connection for as long as it liked;
* ``max_connections`` is the native listener's: the hypercorn door neither
  applies it nor logs that it lowered it;
* the admin listener on a dual-stack ``[::]`` socket records IPv4 clients
  as IPv4 (audit ``source_ip`` ``127.0.0.1``, not ``::ffff:127.0.0.1``);
* a request the upstream has when the shutdown grace period ends is
  cancelled on either door, and, being charged, is counted in the key's
  usage and has its access-log line (503 ``shutdown``); before, it was
  charged but neither counted nor logged.

The real ``triogate serve`` executable (or the real server in-process),
real loopback sockets; nothing here asserts a duration.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from tests.helpers_process import (
    ServeProcess,
    clean_env,
    free_ports,
    run_cli,
    triogate_command,
    write_config,
)
from tests.helpers_process import serving as serving_process
from tests.test_asgi_lifespan import _usage
from tests.test_listener_hardening import _low_fd_limit, _proxy_port, ipv6_loopback_works
from triogate.testing import open_harness

DRIP = {"body_timeout_seconds": 1, "body_deadline_seconds": 1.5, "idle_timeout_seconds": 10}


# ---- helpers ------------------------------------------------------------------------


@contextmanager
def echo_upstream() -> Iterator[int]:
    """The demo echo upstream (reads whole bodies, answers 200) on a free port."""
    [port] = free_ports()
    echo = subprocess.Popen([sys.executable, "-m", "triogate.runtime.echo", str(port)])
    try:
        yield port
    finally:
        echo.terminate()
        echo.wait(10)


@contextmanager
def hypercorn_door(
    tmp_path: Path,
    upstream_port: int,
    *,
    preexec_fn: Callable[[], None] | None = None,
    **server: Any,
) -> Iterator[ServeProcess]:
    """``triogate serve --server hypercorn`` with one catch-all route."""
    config = write_config(tmp_path / "triogate.toml", tmp_path / "data", **server)
    with config.open("a") as f:
        f.write(
            f'[upstreams.echo]\ntargets = ["http://127.0.0.1:{upstream_port}"]\n'
            '[[routes]]\nname = "all"\npath = "/{rest:path}"\nupstream = "echo"\n'
        )
    stderr_path = tmp_path / "stderr.log"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [*triogate_command(), "serve", "-c", str(config), "--server", "hypercorn"],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=clean_env(),
            preexec_fn=preexec_fn,
        )
    sp = ServeProcess(proc, stderr_path)
    try:
        sp.wait_ready()
        yield sp
    finally:
        sp.stop()


def _read_response(sock: socket.socket) -> tuple[int, dict[str, Any] | None]:
    """The status and (JSON) body of one response; bounded reads."""
    sock.settimeout(20)
    data = b""
    for _ in range(1000):
        if b"\r\n\r\n" in data:
            break
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"closed without an answer after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    length = int(headers.get("content-length", "0"))
    for _ in range(1000):
        if len(body) >= length:
            break
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    doc = json.loads(body) if body and "json" in headers.get("content-type", "") else None
    return status, doc


def drip(
    port: int, length: int, *, send: int, pause: float
) -> tuple[int, dict[str, Any] | None, int]:
    """POST a body of ``length`` bytes declared, ``send`` of them a byte
    every ``pause`` seconds (stopping early once an answer is readable);
    the answer's status and body, and the bytes sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /drip HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % length)
        sent = 0
        for _ in range(send):
            if select.select([s], [], [], pause)[0]:
                break  # answered (or closed) already
            try:
                s.sendall(b"x")
            except OSError:
                break
            sent += 1
        status, doc = _read_response(s)
    return status, doc, sent


# ---- 1. the hypercorn door's body timeouts --------------------------------------------


def test_a_dripped_body_is_cut_off_at_the_deadline_by_the_hypercorn_door(tmp_path: Path) -> None:
    """A byte every 0.3 s of 40 (12 s) against a 1.5 s whole-body deadline:
    408 ``REQUEST_TIMEOUT`` naming the deadline, before the body is whole."""
    with echo_upstream() as echo, hypercorn_door(tmp_path, echo, **DRIP) as sp:
        status, doc, sent = drip(_proxy_port(sp), 40, send=40, pause=0.3)
    assert status == 408, doc
    assert doc is not None and doc["code"] == "REQUEST_TIMEOUT", doc
    assert "body_deadline_seconds" in doc["detail"], doc
    assert sent < 40, "the whole body went through: no deadline"


def test_a_stalled_body_gets_408_from_the_hypercorn_door(tmp_path: Path) -> None:
    """Three bytes of 40, then silence: 408 once the next piece is
    ``body_timeout_seconds`` late (not hypercorn's idle timeout, which
    would close the connection unanswered)."""
    with echo_upstream() as echo, hypercorn_door(tmp_path, echo, **DRIP) as sp:
        status, doc, sent = drip(_proxy_port(sp), 40, send=3, pause=0.05)
    assert sent == 3
    assert status == 408, doc
    assert doc is not None and doc["code"] == "REQUEST_TIMEOUT", doc


def test_the_hypercorn_door_sets_and_logs_no_connection_cap(tmp_path: Path) -> None:
    """With 256 descriptors the native listener lowers ``max_connections``
    and says so; the hypercorn door has no such cap, so no such line."""
    with (
        echo_upstream() as echo,
        hypercorn_door(tmp_path, echo, preexec_fn=_low_fd_limit) as sp,
    ):
        r = httpx.get(f"http://127.0.0.1:{_proxy_port(sp)}/up", timeout=10)
        assert r.status_code == 200, r.text
    log = sp.stderr()
    assert "file-descriptor limit raised from 200 to 256" in log, log[-2000:]
    assert "max_connections" not in log, log[-2000:]


# ---- 2. the admin listener on a dual-stack socket --------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_admin_audit_source_ip_is_unmapped_on_a_dual_stack_listener(
    tmp_path: Path, host: str
) -> None:
    assert ipv6_loopback_works(), "this test needs IPv6 loopback"
    async with open_harness(tmp_path, server={"admin_listen": "[::]:0"}) as h:
        assert h.info.admin_url.startswith("http://[::]:"), h.info.admin_url
        port = int(h.info.admin_url.rsplit(":", 1)[1])
        url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
        async with httpx.AsyncClient(base_url=url, timeout=10) as admin:
            r = await admin.post("/setup", json={"name": "root", "email": "root@example.com"})
            assert r.status_code == 201, r.text
            admin.headers["Authorization"] = f"Bearer {r.json()['key']}"
            r = await admin.post("/keys", json={"name": "k", "owner": "o", "scopes": []})
            assert r.status_code == 201, r.text
            r = await admin.get("/audit")
            assert r.status_code == 200, r.text
    entries = r.json()["items"]
    assert [e["action"] for e in entries] == ["key.create", "setup"]
    assert {e["source_ip"] for e in entries} == {host}


# ---- 3. a request cancelled at the end of the shutdown grace period, either door ------


@pytest.mark.parametrize("door", ["native", "hypercorn"])
def test_a_request_cancelled_by_shutdown_is_counted_and_logged(tmp_path: Path, door: str) -> None:
    """The real ``triogate serve``: a request the upstream has and never
    answers is cancelled when the 1 s grace period after SIGTERM ends. It
    was charged (the upstream had it), so after the restart its usage
    counts it and the access log has its line: 503, outcome ``shutdown``."""
    access_log = tmp_path / "access.log"
    with socket.socket() as upstream:  # listens, never answers
        upstream.bind(("127.0.0.1", 0))
        upstream.listen(8)
        config = write_config(
            tmp_path / "triogate.toml",
            tmp_path / "data",
            shutdown_grace_seconds=1,
            proxy_server=door,
        )
        with config.open("a") as f:
            f.write(
                f'[log]\naccess_log = "{access_log}"\n'
                "[upstreams.slow]\n"
                f'targets = ["http://127.0.0.1:{upstream.getsockname()[1]}"]\n'
                "read_timeout_seconds = 60\n"
                '[[routes]]\nname = "slow"\npath = "/{rest:path}"\nupstream = "slow"\n'
                "[routes.plugins]\nkey-auth = {}\n"
            )
        made = run_cli(
            "keys", "create", "-c", str(config), "--json",
            "--name", "k", "--owner", "o", "--credits", "3",
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        key = msgspec.json.decode(made.stdout)
        with serving_process(config) as sp:
            proxy = next(
                line.rsplit("/", 1)[1]
                for line in sp.stdout_lines
                if line.startswith("triogate: proxy listening on ")
            )
            host, port = proxy.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=10) as client:
                client.sendall(
                    f"GET /slow HTTP/1.1\r\nhost: gw\r\n"
                    f"authorization: Bearer {key['key']}\r\n\r\n".encode()
                )
                upstream.settimeout(10)
                conn, _ = upstream.accept()
                with conn:
                    head = b""
                    for _ in range(100):
                        if b"\r\n\r\n" in head:
                            break
                        head += conn.recv(65536)
                    assert head.startswith(b"GET /slow HTTP/1.1"), head
                    assert sp.stop() == 0, sp.stderr()[-3000:]
                client.settimeout(10)
                assert client.recv(65536) == b""  # cancelled: nothing sent
    requests, credits = _usage(config, key["id"])
    assert (requests, credits) == (1, 2), "charged, so counted"
    [line] = [msgspec.json.decode(raw) for raw in access_log.read_text().splitlines()]
    assert (line["status"], line["outcome"], line["key_id"]) == (503, "shutdown", key["id"])
    assert (line["method"], line["path"], line["route"]) == ("GET", "/slow", "slow")
