"""Who pays for a request (CONTRACT §5): charged and counted once any byte of
it went to the upstream, whatever happens after; a refusal before that gives
back what was taken. Every answered or abandoned request has its access-log
line.

End to end: the real gateway (native listener, real LMDB in a temp dir) in
front of a byte-level upstream on loopback that can answer early, hang,
close, or fail, driven with httpx and with raw sockets for the clients that
leave mid-body. Credits and usage are read back through the admin API after
a flush; the access log is read from its file once the server has stopped
(it drains on stop). Real time throughout: the admin API commits to LMDB in
a worker thread, which a virtual clock would race past.
"""

from __future__ import annotations

import socket
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio

from triogate.config import LogConfig
from triogate.dataplane.pipeline import Pipeline, problem_response
from triogate.dataplane.plugin_loader import discover
from triogate.errors import BadRequest, HeadersTooLarge
from triogate.plugins.contract import PluginEnv
from triogate.telemetry.records import RequestRecord
from triogate.testing import Harness, LoopbackServer, harness_config, open_harness

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
FAIL = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\nfail"
POLLS = 500  # bound on every wait-until loop (x 10 ms)


# ---- helpers -------------------------------------------------------------------


class ScriptedUpstream(LoopbackServer):
    """Reads each request head and then, per request, does what its script
    says (``then`` once the script is used up):

    * ``answer``: 200 (keep-alive); ``fail``: 500 (keep-alive);
    * ``early``: 200 at once, without reading the body, then drains until
      the gateway hangs up;
    * ``hang``: never answers (the gateway times out and hangs up);
    * ``close``: closes the connection without a byte of answer.

    Request bodies are only expected with ``early`` and ``hang``."""

    def __init__(self, *script: str, then: str = "answer") -> None:
        self.script = deque(script)
        self.then = then
        self.heads = 0  # request heads that reached it

    async def _connection(self, stream: trio.SocketStream) -> None:
        data = b""
        try:
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    data += chunk
                data = data.partition(b"\r\n\r\n")[2]
                self.heads += 1
                action = self.script.popleft() if self.script else self.then
                if action == "close":
                    return
                if action in ("early", "hang"):
                    if action == "early":
                        await stream.send_all(OK)
                    while await stream.receive_some(65536):
                        pass  # ends when the gateway closes the connection
                    return
                await stream.send_all(OK if action == "answer" else FAIL)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await stream.aclose()


class AnswersThenCloses(LoopbackServer):
    """Reads a request head and answers 200 at once, without reading the
    body, then closes: with ``reset``, abortively (SO_LINGER 0: a reset at
    once), else plainly (the rest of the body then meets a reset).
    ``closed`` counts the connections it is done with."""

    def __init__(self, *, reset: bool) -> None:
        self.reset = reset
        self.closed = 0

    async def _connection(self, stream: trio.SocketStream) -> None:
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            await stream.send_all(OK)
            if self.reset:
                stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await stream.aclose()
            self.closed += 1


@asynccontextmanager
async def gateway(
    tmp_path: Path,
    target: str,
    plugins: dict[str, dict[str, Any]],
    *,
    upstream_settings: dict[str, Any] | None = None,
    routes: list[dict[str, Any]] | None = None,
    server: dict[str, Any] | None = None,
) -> AsyncIterator[Harness]:
    """The real server with an access log in ``tmp_path / "access.log"``."""
    config = harness_config(
        tmp_path / "data",
        target,
        plugins=plugins,
        routes=routes,
        server=server,
        upstream_settings={"read_timeout_seconds": 0.5, **(upstream_settings or {})},
    )
    config = msgspec.structs.replace(config, log=LogConfig(access_log=str(tmp_path / "access.log")))
    async with open_harness(tmp_path, config=config) as h:
        yield h


@asynccontextmanager
async def serving(upstream: LoopbackServer) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(upstream.run)
        yield
        nursery.cancel_scope.cancel()


async def until(condition: Callable[[], bool]) -> None:
    """Poll state owned by the product (there is no event to wait on)."""
    for _ in range(POLLS):
        if condition():
            return
        await trio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def new_key(h: Harness, credits: int) -> tuple[dict[str, str], str, str]:
    """Admin headers, and a key's id and plaintext (made through the API)."""
    r = await h.admin.post("/setup", json={"name": "root", "email": "root@example.com"})
    if r.status_code == 201:
        h.admin.headers["Authorization"] = f"Bearer {r.json()['key']}"
    body = {"name": "k", "owner": "o", "scopes": [], "credits": {"remaining": credits}}
    r = await h.admin.post("/keys", json=body)
    assert r.status_code == 201, r.text
    doc = r.json()
    return dict(h.admin.headers), doc["id"], doc["key"]


async def usage(h: Harness, key_id: str) -> dict[str, Any]:
    """The key's usage as stored, after every actor has flushed to LMDB."""
    gw = h.server.gateway
    assert gw is not None
    await gw.actors.flush(list(gw.actors.actors.values()))
    r = await h.admin.get(f"/keys/{key_id}/usage")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def in_flight(h: Harness) -> int:
    gw = h.server.gateway
    assert gw is not None
    return gw.current_pipeline().in_flight


def problem(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["code"] == code, r.text


def access_lines(tmp_path: Path) -> list[dict[str, Any]]:
    """The proxied requests' lines (the admin API's, route ``admin``, aside)."""
    text = (tmp_path / "access.log").read_text()
    lines = [msgspec.json.decode(line) for line in text.splitlines()]
    return [line for line in lines if line["route"] != "admin"]


async def abandon_mid_body(h: Harness, key: str, method: str, ready: Callable[[], bool]) -> bytes:
    """Send a head declaring a 100 kB body and 10 bytes of it, wait until
    ``ready()``, then stop sending (half-close); return whatever the gateway
    sent back before it hung up."""
    host, port = h.info.proxy_url.removeprefix("http://").rsplit(":", 1)
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        head = (
            f"{method} /r HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\n"
            "content-length: 100000\r\n\r\n"
        ).encode()
        await stream.send_all(head + b"x" * 10)
        await until(lambda: in_flight(h) == 1)
        await until(ready)
        await stream.send_eof()
        got = b""
        for _ in range(POLLS):
            with trio.fail_after(5):
                chunk = await stream.receive_some(65536)
            if not chunk:
                return got
            got += chunk
    raise AssertionError("the gateway kept sending")


# ---- (a) a client that leaves mid-body after the upstream had the request --------------------


async def test_client_leaving_mid_body_after_sending_is_charged_and_logged(
    tmp_path: Path,
) -> None:
    """The upstream answers on the head alone; the client sends 10 of a
    declared 100 kB, then leaves. The request reached the upstream: one
    credit spent, one request in the usage (499, a 4xx), an access-log line
    ``client_closed``; the client is sent nothing."""
    up = ScriptedUpstream(then="early")
    async with serving(up), gateway(tmp_path, up.url, {"key-auth": {}}) as h:
        _, key_id, key = await new_key(h, credits=3)
        got = await abandon_mid_body(h, key, "POST", lambda: up.heads == 1)
        assert got == b""  # nothing sent: there is nobody to answer
        await until(lambda: in_flight(h) == 0)
        doc = await usage(h, key_id)
        assert doc["credits_remaining"] == 2
        assert doc["requests"] == 1
        assert doc["by_status_class"]["4xx"] == 1
    [line] = access_lines(tmp_path)
    assert (line["status"], line["outcome"], line["key_id"]) == (499, "client_closed", key_id)
    assert (line["method"], line["path"], line["route"]) == ("POST", "/r", "test")


# ---- (b) 504 and 502 once the upstream had the request ----------------------------------------


@pytest.mark.parametrize(
    ("action", "status", "code"),
    [("hang", 504, "UPSTREAM_TIMEOUT"), ("close", 502, "BAD_GATEWAY")],
)
async def test_gateway_errors_after_sending_are_charged(
    tmp_path: Path, action: str, status: int, code: str
) -> None:
    """Three requests on a 3-credit key all reach the upstream, which times
    out (504) or hangs up after reading (502): the credits are spent, and
    the 4th is refused with ``QUOTA_EXCEEDED`` without reaching it."""
    up = ScriptedUpstream(then=action)
    async with serving(up), gateway(tmp_path, up.url, {"key-auth": {}}) as h:
        _, key_id, key = await new_key(h, credits=3)
        auth = {"Authorization": f"Bearer {key}"}
        for _ in range(3):
            problem(await h.client.get("/r", headers=auth), status, code)
        assert up.heads == 3
        assert (await usage(h, key_id))["credits_remaining"] == 0
        problem(await h.client.get("/r", headers=auth), 429, "QUOTA_EXCEEDED")
        assert up.heads == 3
        doc = await usage(h, key_id)
        assert doc["requests"] == 4
        assert (doc["by_status_class"]["5xx"], doc["by_status_class"]["4xx"]) == (3, 1)
    lines = access_lines(tmp_path)
    assert [line["outcome"] for line in lines] == [code] * 3 + ["QUOTA_EXCEEDED"]


# ---- (c) refused before sending: what was taken goes back -------------------------------------


async def test_connection_refused_gives_the_credit_back(tmp_path: Path) -> None:
    with trio.socket.socket() as s:  # a loopback port where nothing listens
        await s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    async with gateway(tmp_path, dead, {"key-auth": {}}) as h:
        _, key_id, key = await new_key(h, credits=3)
        auth = {"Authorization": f"Bearer {key}"}
        for _ in range(5):
            problem(await h.client.get("/r", headers=auth), 502, "BAD_GATEWAY")
        doc = await usage(h, key_id)
        assert doc["credits_remaining"] == 3
        assert doc["requests"] == 5  # counted as traffic, not charged


async def test_open_breaker_gives_the_credit_back_and_an_upstream_500_does_not(
    tmp_path: Path,
) -> None:
    up = ScriptedUpstream(then="fail")
    plugins = {
        "key-auth": {},
        "circuit-breaker": {"failure_threshold": 1, "open_seconds": 60, "minimum_requests": 1000},
    }
    async with serving(up), gateway(tmp_path, up.url, plugins) as h:
        _, key_id, key = await new_key(h, credits=3)
        auth = {"Authorization": f"Bearer {key}"}
        assert (await h.client.get("/r", headers=auth)).status_code == 500  # the upstream's
        for _ in range(3):
            problem(await h.client.get("/r", headers=auth), 503, "UPSTREAM_UNAVAILABLE")
        assert up.heads == 1
        assert (await usage(h, key_id))["credits_remaining"] == 2


async def test_access_phase_refusal_gives_the_credit_back(tmp_path: Path) -> None:
    up = ScriptedUpstream()
    plugins = {"key-auth": {}, "rate-limit": {"limit": 1, "period_seconds": 60, "by": "key"}}
    async with serving(up), gateway(tmp_path, up.url, plugins) as h:
        _, key_id, key = await new_key(h, credits=3)
        auth = {"Authorization": f"Bearer {key}"}
        assert (await h.client.get("/r", headers=auth)).status_code == 200
        problem(await h.client.get("/r", headers=auth), 429, "RATE_LIMITED")
        assert up.heads == 1
        assert (await usage(h, key_id))["credits_remaining"] == 2


async def test_client_leaving_before_anything_was_sent_costs_nothing_but_is_logged(
    tmp_path: Path,
) -> None:
    """With retry on, a short body is read whole (to replay it) before the
    upstream is called: a client leaving mid-body then never reached the
    upstream. Its credit goes back; the request still has its line."""
    up = ScriptedUpstream()
    plugins = {"key-auth": {}, "retry": {"attempts": 2, "max_replay_bytes": 1 << 20}}
    async with serving(up), gateway(tmp_path, up.url, plugins) as h:
        _, key_id, key = await new_key(h, credits=3)
        # The retry plugin is reading the body, to replay it: nothing sent yet.
        assert await abandon_mid_body(h, key, "PUT", lambda: True) == b""
        await until(lambda: in_flight(h) == 0)
        assert up.heads == 0
        assert (await usage(h, key_id))["credits_remaining"] == 3
    [line] = access_lines(tmp_path)
    assert (line["status"], line["outcome"], line["key_id"]) == (499, "client_closed", key_id)


# ---- (d) retries: one request, one charge ---------------------------------------------------


async def test_a_retried_request_is_charged_once(tmp_path: Path) -> None:
    up = ScriptedUpstream(*["close"] * 10)
    retry = {"attempts": 3, "backoff_base_seconds": 0, "backoff_cap_seconds": 0}
    async with serving(up), gateway(tmp_path, up.url, {"key-auth": {}, "retry": retry}) as h:
        _, key_id, key = await new_key(h, credits=3)
        auth = {"Authorization": f"Bearer {key}"}
        for _ in range(3):  # three tries each, every one hung up on
            problem(await h.client.get("/r", headers=auth), 502, "BAD_GATEWAY")
        assert up.heads == 9
        assert (await usage(h, key_id))["credits_remaining"] == 0
        problem(await h.client.get("/r", headers=auth), 429, "QUOTA_EXCEEDED")
        assert up.heads == 9

        # Failed once, then answered: one credit, one request in the usage.
        _, key_id, key = await new_key(h, credits=2)
        r = await h.client.get("/r", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.content == b"ok"
        assert up.heads == 11
        doc = await usage(h, key_id)
        assert (doc["credits_remaining"], doc["requests"]) == (1, 1)
    assert [line["retries"] for line in access_lines(tmp_path)] == [2, 2, 2, 0, 1]


# ---- (e) an upstream that answers before reading the body, then closes ------------------------


@pytest.mark.parametrize("door", ["native", "hypercorn"])
@pytest.mark.parametrize("reset", [True, False], ids=["reset", "close"])
async def test_an_early_answer_then_a_close_is_forwarded_not_a_502(
    tmp_path: Path, door: str, reset: bool
) -> None:
    """The upstream answers 200 on the head of a 200 kB POST and closes; the
    rest of the body meets a reset (EPIPE/ECONNRESET while sending). Its
    answer was already in the gateway's buffer: the client gets that 200,
    not a 502, the request is charged, and the connection is closed after
    (the body was never read whole)."""
    up = AnswersThenCloses(reset=reset)
    server = {"proxy_server": door}
    async with serving(up), gateway(tmp_path, up.url, {"key-auth": {}}, server=server) as h:
        _, key_id, key = await new_key(h, credits=3)
        host, port = h.info.proxy_url.removeprefix("http://").rsplit(":", 1)
        total, first = 200_000, 10_000
        head = (
            f"POST /r HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\n"
            f"content-length: {total}\r\n\r\n"
        ).encode()
        got = b""
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            await stream.send_all(head + b"x" * first)
            await until(lambda: up.closed == 1)  # answered and gone
            async with trio.open_nursery() as nursery:

                async def rest() -> None:
                    for _ in range((total - first) // 10_000):
                        try:
                            await stream.send_all(b"x" * 10_000)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            return  # the gateway answered and hung up

                nursery.start_soon(rest)
                for _ in range(POLLS):
                    with trio.fail_after(10):
                        try:
                            chunk = await stream.receive_some(65536)
                        except trio.BrokenResourceError:
                            chunk = b""
                    if not chunk:
                        break
                    got += chunk
                else:
                    raise AssertionError("the gateway kept the connection open")
                nursery.cancel_scope.cancel()
        status_line, _, rest_of_it = got.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 200 OK", got[:300]
        assert rest_of_it.endswith(b"\r\n\r\nok"), got[:300]
        await until(lambda: in_flight(h) == 0)
        doc = await usage(h, key_id)
        assert (doc["credits_remaining"], doc["requests"]) == (2, 1)
        assert doc["by_status_class"]["2xx"] == 1
    [line] = access_lines(tmp_path)
    assert (line["status"], line["outcome"], line["key_id"]) == (200, "ok", key_id)


# ---- requests the front door refuses by itself ----------------------------------------------


def test_log_refused_tells_the_observers() -> None:
    """``Pipeline.log_refused``: the front door's own refusals (400, 408,
    413, 431) reach the access log and the metrics, with their code and
    request id, the path only (a query may hold a key), bounded."""
    config = harness_config(Path("/nonexistent"), "http://127.0.0.1:9")
    pipeline = Pipeline.build(config, discover(), PluginEnv())
    records: list[RequestRecord] = []
    pipeline.observers = [records.append]
    try:
        bad = problem_response(BadRequest("malformed request"), "rid-1")
        pipeline.log_refused("GET", "/probe/%%32%65?api_key=secret", "10.0.0.9", bad)
        huge = problem_response(HeadersTooLarge("too large"), "rid-2")
        pipeline.log_refused("X" * 500, "/" + "a" * 100_000, "10.0.0.9", huge, started_at=0.0)
    finally:
        pipeline.close()
    first, second = records
    assert (first.status, first.outcome, first.request_id) == (400, "BAD_REQUEST", "rid-1")
    assert (first.method, first.path, first.client_ip) == ("GET", "/probe/%%32%65", "10.0.0.9")
    assert (first.route, first.key_id, first.upstream_seconds) == (None, None, None)
    assert (second.status, second.outcome, second.request_id) == (
        431,
        HeadersTooLarge.code,
        "rid-2",
    )
    assert len(second.method) <= 32 and len(second.path) <= 2048
    assert second.duration_seconds >= 0
