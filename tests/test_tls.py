"""TLS termination on the native listener (``[server.tls]``), through the real
listener with real TLS clients: requests over HTTPS (scheme, ALPN,
keep-alive), mTLS (required and optional, the subject a plugin reads), and
bad input (garbage client hello, plain HTTP, a handshake that never ends):
each gets a closed connection, counted, never a traceback, and the gateway
keeps serving others."""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.helpers_tls import Certs, make_certs
from triogate.dataplane.listener import ProxyListener
from triogate.plugins.contract import Context, NoConfig, Plugin, Response
from triogate.testing import FakeUpstream, Harness, open_harness

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


class CertStamp(Plugin[NoConfig]):
    """Answers say which client certificate the plugin saw (ctx.client_cert)."""

    name = "cert-stamp"
    priority = 100

    def response_nowait(self, ctx: Context, response: Response) -> None:
        subject = ctx.client_cert
        response.headers.raw.append((b"x-client-cert", (subject or "none").encode()))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def tls_table(certs: Certs, **extra: Any) -> dict[str, Any]:
    return {"cert_file": str(certs.cert_file), "key_file": str(certs.key_file), **extra}


@asynccontextmanager
async def tls_harness(
    tmp_path: Path, certs: Certs, upstream: FakeUpstream | None = None, **tls: Any
) -> AsyncIterator[Harness]:
    async with open_harness(
        tmp_path,
        upstream=upstream,
        plugins={"cert-stamp": {}},
        extra_plugins=[CertStamp],
        server={"tls": tls_table(certs, **tls)},
    ) as h:
        yield h


def listener(h: Harness) -> ProxyListener:
    assert h.server.proxy is not None
    return h.server.proxy


def address(h: Harness) -> tuple[str, int]:
    host, _, port = h.info.proxy_url.removeprefix("https://").rpartition(":")
    return host, int(port)


def https(h: Harness, certs: Certs, *, with_cert: bool = False) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=h.info.proxy_url,
        verify=certs.client_context(with_cert=with_cert),
        timeout=10,
    )


def _raw_exchange(where: tuple[str, int], data: bytes) -> bytes:
    """Send ``data`` on a fresh TCP connection and read until the gateway
    closes it (bounded: 10 s, far beyond the handshake timeout)."""
    with socket.create_connection(where, timeout=10) as sock:
        if data:
            sock.sendall(data)
        got = b""
        for _ in range(64):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
        return got


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


async def test_https_requests_over_one_kept_alive_connection(tmp_path: Path, certs: Certs) -> None:
    async with tls_harness(tmp_path, certs) as h:
        assert h.info.proxy_url.startswith("https://")
        async with https(h, certs) as client:
            for i in range(3):
                r = await client.get(f"/hello/{i}")
                assert r.status_code == 200, r.text
                assert r.headers["x-client-cert"] == "none"
        # Three requests, one connection: the handshake is paid once.
        assert listener(h).statistics().accepted == 1
        assert listener(h).statistics().tls is True
        seen = h.upstream.requests[-1]
        assert ("x-forwarded-proto", "https") in [(k.lower(), v) for k, v in seen.headers]


def _alpn(where: tuple[str, int], certs: Certs, offered: list[str]) -> tuple[str | None, str]:
    context = certs.client_context()
    context.set_alpn_protocols(offered)
    with (
        socket.create_connection(where, timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        version = tls.version() or ""
        return tls.selected_alpn_protocol(), version


async def test_alpn_is_http_1_1_and_tls_is_modern(tmp_path: Path, certs: Certs) -> None:
    async with tls_harness(tmp_path, certs) as h:
        selected, version = await trio.to_thread.run_sync(
            _alpn, address(h), certs, ["h2", "http/1.1"]
        )
        assert selected == "http/1.1"
        assert version in ("TLSv1.2", "TLSv1.3")
        context = listener(h).tls_context
        assert context is not None
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert context.options & ssl.OP_NO_RENEGOTIATION
        assert not any("RC4" in c["name"] or "3DES" in c["name"] for c in context.get_ciphers())


async def test_garbage_and_plain_http_get_a_closed_connection(
    tmp_path: Path, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="triogate")
    async with tls_harness(tmp_path, certs) as h:
        where = address(h)
        hello_garbage = b"\x16\x03\x01\x00\x40" + b"\x99" * 64  # a record of nonsense
        answer = await trio.to_thread.run_sync(_raw_exchange, where, hello_garbage)
        assert b"HTTP/" not in answer
        plain = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
        answer = await trio.to_thread.run_sync(_raw_exchange, where, plain)
        assert b"HTTP/" not in answer  # no plain-text answer on the TLS port
        noise = bytes(range(256)) * 4
        answer = await trio.to_thread.run_sync(_raw_exchange, where, noise)
        assert b"HTTP/" not in answer
        assert listener(h).statistics().tls_failures == 3
        # ... and scraped: the listener's counters are in /metrics.
        async with httpx.AsyncClient(base_url=h.info.admin_url, timeout=10) as admin:
            scraped = (await admin.get("/metrics")).text
        assert "triogate_listener_tls_handshake_failures_total 3.0" in scraped
        assert "triogate_listener_accepted_total 3.0" in scraped
        # Still serving everyone else.
        async with https(h, certs) as client:
            assert (await client.get("/after")).status_code == 200
        assert listener(h).statistics().connections <= 1
    assert any("TLS handshake" in r.getMessage() for r in caplog.records)
    no_tracebacks(caplog)


async def test_a_handshake_that_never_finishes_is_closed(
    tmp_path: Path, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    async with tls_harness(tmp_path, certs, handshake_timeout_seconds=0.3) as h:
        where = address(h)
        async with trio.open_nursery() as nursery:
            silent: list[bytes] = []
            partial: list[bytes] = []

            async def stall(data: bytes, into: list[bytes]) -> None:
                into.append(await trio.to_thread.run_sync(_raw_exchange, where, data))

            nursery.start_soon(stall, b"", silent)
            # The first bytes of a client hello, then nothing.
            nursery.start_soon(stall, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", partial)
            # Meanwhile other clients are served.
            async with https(h, certs) as client:
                for _ in range(3):
                    assert (await client.get("/meanwhile")).status_code == 200
        # Both were hung up on (well before the 60 s idle timeout or the
        # client's own 10 s: the handshake timeout).
        assert silent == [b""] and partial == [b""]
        assert listener(h).statistics().tls_failures == 2
    no_tracebacks(caplog)


async def test_mtls_required(tmp_path: Path, certs: Certs) -> None:
    async with tls_harness(
        tmp_path, certs, client_ca_file=str(certs.ca_file), client_cert="required"
    ) as h:
        async with https(h, certs, with_cert=True) as client:
            r = await client.get("/mine")
            assert r.status_code == 200
            assert r.headers["x-client-cert"] == "CN=alice,OU=Dev,O=Example"
        async with https(h, certs) as client:
            with pytest.raises(httpx.TransportError):
                await client.get("/no-cert")
        assert h.upstream.requests[-1].path == "/mine"
        # A certificate from another CA is refused too.
        stranger = make_certs(tmp_path / "other")
        async with httpx.AsyncClient(
            base_url=h.info.proxy_url, verify=_trusting(certs, stranger), timeout=10
        ) as client:
            with pytest.raises(httpx.TransportError):
                await client.get("/stranger")
        assert h.upstream.requests[-1].path == "/mine"
        assert listener(h).statistics().tls_failures >= 1


def _trusting(server: Certs, client: Certs) -> ssl.SSLContext:
    """Trusts ``server``'s CA, presents ``client``'s certificate."""
    context = ssl.create_default_context(cafile=str(server.ca_file))
    context.load_cert_chain(str(client.client_cert_file), str(client.client_key_file))
    return context


async def test_mtls_optional(tmp_path: Path, certs: Certs) -> None:
    async with tls_harness(
        tmp_path, certs, client_ca_file=str(certs.ca_file), client_cert="optional"
    ) as h:
        async with https(h, certs) as client:
            r = await client.get("/anonymous")
            assert r.status_code == 200
            assert r.headers["x-client-cert"] == "none"
        async with https(h, certs, with_cert=True) as client:
            r = await client.get("/known")
            assert r.headers["x-client-cert"] == "CN=alice,OU=Dev,O=Example"


async def test_a_plain_listener_has_no_client_certificate(tmp_path: Path) -> None:
    async with open_harness(tmp_path, plugins={"cert-stamp": {}}, extra_plugins=[CertStamp]) as h:
        r = await h.client.get("/plain")
        assert r.headers["x-client-cert"] == "none"
        assert ("x-forwarded-proto", "http") in [
            (k.lower(), v) for k, v in h.upstream.requests[-1].headers
        ]
        assert listener(h).statistics().tls is False
