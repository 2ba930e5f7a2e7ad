"""Review of TLS (issue 15) as a hostile client and a strict reviewer: old
protocol versions and weak ciphers refused, no renegotiation, ALPN and SNI
oddities, mTLS corner cases (expired certificate, a foreign CA with
``optional``, resumption), subject strings that could inject into headers or
logs, slow and half-open handshakes against the caps, truncated records,
big bodies and pipelining over TLS, and file problems (encrypted keys,
directories) named clearly."""

from __future__ import annotations

import datetime
import functools
import gc
import logging
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme
from cryptography.hazmat.primitives import serialization

from tests.helpers_gateway import assert_problem
from tests.helpers_tls import Certs, make_certs
from triogate.config_tls import ServerTLSConfig, server_context
from triogate.dataplane.listener import ProxyListener
from triogate.dataplane.tls import TLSSocket, peer_subject
from triogate.errors import ConfigError
from triogate.plugins.contract import Context, NoConfig, Plugin, Response
from triogate.testing import FakeResponse, FakeUpstream, Harness, RecordedRequest, open_harness

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


class SubjectEcho(Plugin[NoConfig]):
    """Answers carry the subject the plugin saw, escaped for a header value
    by the test (what a careless plugin would do is checked on the string)."""

    name = "subject-echo"
    priority = 100

    seen: list[str | None] = []

    def response_nowait(self, ctx: Context, response: Response) -> None:
        SubjectEcho.seen.append(ctx.client_cert)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@asynccontextmanager
async def harness(
    tmp_path: Path, certs: Certs, upstream: FakeUpstream | None = None, **tls: Any
) -> AsyncIterator[Harness]:
    extra: dict[str, Any] = tls.pop("server_extra", {})
    server: dict[str, Any] = {
        "tls": {"cert_file": str(certs.cert_file), "key_file": str(certs.key_file), **tls},
        **extra,
    }
    async with open_harness(
        tmp_path,
        upstream=upstream,
        plugins={"subject-echo": {}},
        extra_plugins=[SubjectEcho],
        server=server,
    ) as h:
        yield h


def listener(h: Harness) -> ProxyListener:
    assert h.server.proxy is not None
    return h.server.proxy


def address(h: Harness) -> tuple[str, int]:
    host, _, port = h.info.proxy_url.removeprefix("https://").rpartition(":")
    return host, int(port)


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


def _handshake(where: tuple[str, int], context: ssl.SSLContext, **kw: Any) -> str:
    """One handshake and one request; the status line (raises on failure)."""
    with (
        socket.create_connection(where, timeout=10) as raw,
        context.wrap_socket(raw, **kw) as tls,
    ):
        tls.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = b""
        for _ in range(100):
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
        return data.split(b"\r\n", 1)[0].decode()


# -- protocol versions, ciphers, compression, renegotiation ------------------


def _old_client(certs: Certs, version: ssl.TLSVersion) -> ssl.SSLContext:
    context = certs.client_context()
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.maximum_version = version
    context.set_ciphers("ALL:@SECLEVEL=0")
    return context


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_tls_1_0_and_1_1_are_refused_by_the_server(tmp_path: Path, certs: Certs) -> None:
    async with harness(tmp_path, certs) as h:
        where = address(h)
        for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            with pytest.raises(ssl.SSLError) as err:
                await trio.to_thread.run_sync(
                    lambda v=version: _handshake(
                        where, _old_client(certs, v), server_hostname="127.0.0.1"
                    )
                )
            # The server's refusal (an alert), not the client's own refusal
            # to offer it.
            assert "ALERT" in str(err.value) or "UNSUPPORTED_PROTOCOL" in str(err.value), err.value
        assert listener(h).statistics().tls_failures == 2
        # TLS 1.2 alone still works, without compression.
        context = certs.client_context()
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        assert await trio.to_thread.run_sync(
            lambda: _handshake(where, context, server_hostname="127.0.0.1")
        ) == ("HTTP/1.1 200 OK")


async def test_weak_ciphers_are_refused(tmp_path: Path, certs: Certs) -> None:
    async with harness(tmp_path, certs) as h:
        where = address(h)
        for weak in ("AES128-SHA", "ECDHE-ECDSA-AES128-SHA", "DES-CBC3-SHA", "aNULL", "eNULL"):
            context = certs.client_context()
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            context.check_hostname = weak not in ("aNULL",)
            if weak == "aNULL":
                context.verify_mode = ssl.CERT_NONE
            try:
                context.set_ciphers(f"{weak}:@SECLEVEL=0")
            except ssl.SSLError:
                continue  # this OpenSSL build has none of it at all
            with pytest.raises(ssl.SSLError):
                await trio.to_thread.run_sync(
                    lambda c=context: _handshake(where, c, server_hostname="127.0.0.1")
                )
        context = listener(h).tls_context
        assert context is not None
        for cipher in context.get_ciphers():
            for bad in ("RC4", "3DES", "DES-CBC", "NULL", "EXP", "MD5", "anon", "PSK", "SRP"):
                assert bad not in cipher["name"] and bad not in cipher["description"], cipher


def _renegotiate(where: tuple[str, int], ca_file: Path) -> str:
    """openssl s_client on TLS 1.2 asks for a renegotiation ("R")."""
    openssl = shutil.which("openssl")
    assert openssl, "install the openssl command-line tool (apt-get install openssl)"
    proc = subprocess.run(
        [
            openssl,
            "s_client",
            "-connect",
            f"{where[0]}:{where[1]}",
            "-tls1_2",
            "-CAfile",
            str(ca_file),
        ],
        input=b"R\n",
        capture_output=True,
        timeout=30,
    )
    return (proc.stdout + proc.stderr).decode(errors="replace")


async def test_client_initiated_renegotiation_is_refused(tmp_path: Path, certs: Certs) -> None:
    async with harness(tmp_path, certs) as h:
        out = await trio.to_thread.run_sync(_renegotiate, address(h), certs.ca_file)
        assert "RENEGOTIATING" in out, out
        assert "no renegotiation" in out, out  # the server's no_renegotiation alert
        # And the gateway is fine afterwards.
        status = await trio.to_thread.run_sync(
            lambda: _handshake(address(h), certs.client_context(), server_hostname="127.0.0.1")
        )
        assert status == "HTTP/1.1 200 OK"


async def test_alpn_h2_only_and_no_or_odd_sni(tmp_path: Path, certs: Certs) -> None:
    async with harness(tmp_path, certs) as h:
        where = address(h)

        def h2_only() -> tuple[str | None, str, bool]:
            context = certs.client_context()
            context.set_alpn_protocols(["h2"])
            with (
                socket.create_connection(where, timeout=10) as raw,
                context.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                tls.sendall(b"GET /h2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                status = tls.recv(65536).split(b"\r\n", 1)[0].decode()
                return tls.selected_alpn_protocol(), status, tls.compression() is None

        selected, status, no_compression = await trio.to_thread.run_sync(h2_only)
        assert selected is None and status == "HTTP/1.1 200 OK" and no_compression
        # No SNI at all.
        context = certs.client_context()
        context.check_hostname = False
        assert (
            await trio.to_thread.run_sync(lambda: _handshake(where, context))
        ) == "HTTP/1.1 200 OK"
        # A name the certificate does not have: served with the one
        # certificate (the client is the one to object).
        context = certs.client_context()
        context.check_hostname = False
        assert (
            await trio.to_thread.run_sync(
                lambda: _handshake(
                    where, context, server_hostname="a" * 63 + "." + "b" * 63 + ".example"
                )
            )
        ) == "HTTP/1.1 200 OK"


# -- mTLS ---------------------------------------------------------------------


def _client_with(certs: Certs, cert: trustme.LeafCert, directory: Path) -> ssl.SSLContext:
    directory.mkdir(parents=True, exist_ok=True)
    pem = directory / "c.pem"
    key = directory / "c.key"
    pem.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    context = certs.client_context()
    context.load_cert_chain(str(pem), str(key))
    return context


async def test_mtls_expired_and_foreign_certificates(tmp_path: Path, certs: Certs) -> None:
    now = datetime.datetime.now(datetime.UTC)
    expired = certs.ca.issue_cert(
        "old@example.com",
        common_name="old",
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    foreign = trustme.CA().issue_cert("eve@example.com", common_name="eve")
    for mode in ("required", "optional"):
        SubjectEcho.seen.clear()
        async with harness(
            tmp_path / mode, certs, client_ca_file=str(certs.ca_file), client_cert=mode
        ) as h:
            where = address(h)
            for cert, name in ((expired, "expired"), (foreign, "foreign")):
                context = _client_with(certs, cert, tmp_path / mode / name)
                # TLS 1.3 reports the refusal on the client's first read.
                with pytest.raises((ssl.SSLError, ConnectionError)):
                    status = await trio.to_thread.run_sync(
                        functools.partial(_handshake, where, context, server_hostname="127.0.0.1")
                    )
                    assert not status  # an empty answer (closed) counts as refused too
                    raise ConnectionError("closed")
            assert h.upstream.requests == []
            assert SubjectEcho.seen == []


async def test_mtls_session_resumption_keeps_the_subject(tmp_path: Path, certs: Certs) -> None:
    SubjectEcho.seen.clear()
    async with harness(
        tmp_path, certs, client_ca_file=str(certs.ca_file), client_cert="required"
    ) as h:
        where = address(h)

        def twice() -> tuple[bool, bool]:
            context = certs.client_context(with_cert=True)
            context.maximum_version = ssl.TLSVersion.TLSv1_2  # a session right after the handshake
            with (
                socket.create_connection(where, timeout=10) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
            ):
                tls.sendall(b"GET /1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                assert tls.recv(65536).startswith(b"HTTP/1.1 200")
                session = tls.session
            with (
                socket.create_connection(where, timeout=10) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls,
            ):
                tls.sendall(b"GET /2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                assert tls.recv(65536).startswith(b"HTTP/1.1 200")
                return tls.session_reused, True

        reused, _ = await trio.to_thread.run_sync(twice)
        assert reused
        assert SubjectEcho.seen == ["CN=alice,OU=Dev,O=Example"] * 2


def test_subject_control_characters_are_escaped(tmp_path: Path) -> None:
    """A CN with CR/LF, NUL or other control characters must not reach
    plugins (who may put it in a header or a log line) raw."""

    class Fake:
        def __init__(self, cert: dict[str, Any]) -> None:
            self.cert = cert

        def getpeercert(self) -> dict[str, Any]:
            return self.cert

    nasty = "bob\r\nX-Admin: yes\x00\x1b[31m"
    subject = peer_subject(
        Fake({"subject": ((("commonName", nasty),), (("organizationName", "Ünïcode, Inc="),))})  # type: ignore[arg-type]
    )
    assert subject is not None
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in subject), repr(subject)
    assert subject.startswith("O=Ünïcode\\, Inc\\=,CN=bob\\0D\\0AX-Admin: yes\\00\\1B[31m")


async def test_a_nasty_subject_through_the_listener(tmp_path: Path, certs: Certs) -> None:
    SubjectEcho.seen.clear()
    cert = certs.ca.issue_cert("n@example.com", common_name="a,b=c\r\nX-Evil: 1")
    async with harness(
        tmp_path, certs, client_ca_file=str(certs.ca_file), client_cert="optional"
    ) as h:
        context = _client_with(certs, cert, tmp_path / "nasty")
        status = await trio.to_thread.run_sync(
            lambda: _handshake(address(h), context, server_hostname="127.0.0.1")
        )
        assert status == "HTTP/1.1 200 OK"
        assert len(SubjectEcho.seen) == 1
        assert (SubjectEcho.seen[0] or "").startswith("CN=a\\,b\\=c\\0D\\0AX-Evil: 1,")


async def test_a_subject_header_from_the_client_is_not_the_certificate(
    tmp_path: Path, certs: Certs
) -> None:
    SubjectEcho.seen.clear()
    async with harness(
        tmp_path, certs, client_ca_file=str(certs.ca_file), client_cert="optional"
    ) as h:
        async with httpx.AsyncClient(
            base_url=h.info.proxy_url, verify=certs.client_context(), timeout=10
        ) as client:
            headers = {
                "x-client-cert": "CN=admin",
                "x-ssl-client-s-dn": "CN=admin",
                "ssl-client-subject": "CN=admin",
                "x-forwarded-client-cert": 'Subject="CN=admin"',  # Envoy's XFCC
                "x-forwarded-proto": "http",
            }
            assert (await client.get("/spoof", headers=headers)).status_code == 200
        assert SubjectEcho.seen == [None]
        seen = [(k.lower(), v) for k, v in h.upstream.requests[-1].headers]
        assert ("x-forwarded-proto", "https") in seen
        assert ("x-forwarded-proto", "http") not in seen
        assert not [k for k, _ in seen if k == "x-forwarded-client-cert"]


# -- slow, half-open, truncated ----------------------------------------------


def _client_hello(certs: Certs) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = certs.client_context().wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


async def test_a_slowloris_handshake_is_bounded_by_the_handshake_timeout(
    tmp_path: Path, certs: Certs
) -> None:
    hello = _client_hello(certs)
    assert len(hello) > 100
    async with harness(tmp_path, certs, handshake_timeout_seconds=0.5) as h:

        def drip() -> int:
            """One byte every 0.05 s (the whole hello would take > 5 s):
            the bytes sent before the gateway hung up."""
            with socket.create_connection(address(h), timeout=10) as sock:
                for i, byte in enumerate(hello):
                    try:
                        sock.sendall(bytes([byte]))
                    except OSError:
                        return i
                    time.sleep(0.05)
                    sock.setblocking(False)
                    try:
                        if sock.recv(1) == b"":
                            return i + 1
                    except BlockingIOError:
                        pass
                    except OSError:
                        return i + 1
                    finally:
                        sock.setblocking(True)
                return len(hello)

        sent = await trio.to_thread.run_sync(drip)
        assert sent < len(hello)
        assert listener(h).statistics().tls_failures == 1


async def test_half_open_handshakes_count_against_max_connections(
    tmp_path: Path, certs: Certs
) -> None:
    async with harness(
        tmp_path, certs, handshake_timeout_seconds=30, server_extra={"max_connections": 3}
    ) as h:
        where = address(h)
        silent = [socket.create_connection(where, timeout=10) for _ in range(3)]
        try:
            for _ in range(200):
                if listener(h).statistics().connections == 3:
                    break
                await trio.sleep(0.01)
            assert listener(h).statistics().connections == 3
            with pytest.raises((ssl.SSLError, OSError)):
                await trio.to_thread.run_sync(
                    lambda: _handshake(where, certs.client_context(), server_hostname="127.0.0.1")
                )
            assert listener(h).statistics().refused >= 1
        finally:
            for sock in silent:
                sock.close()
        for _ in range(500):
            if listener(h).statistics().connections == 0:
                break
            await trio.sleep(0.01)
        status = await trio.to_thread.run_sync(
            lambda: _handshake(where, certs.client_context(), server_hostname="127.0.0.1")
        )
        assert status == "HTTP/1.1 200 OK"


def _tls_bytes(where: tuple[str, int], certs: Certs, cut: int, request: bytes) -> None:
    """Handshake with a memory-BIO client, then send ``request`` encrypted
    but only its first ``cut`` bytes of records (or all when cut < 0), then
    a TCP FIN without close_notify."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = certs.client_context().wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with socket.create_connection(where, timeout=10) as sock:
        for _ in range(50):
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        sock.sendall(outgoing.read())
        obj.write(request)
        records = outgoing.read()
        sock.sendall(records if cut < 0 else records[:cut])
        sock.shutdown(socket.SHUT_WR)
        for _ in range(100):
            if not sock.recv(65536):
                break


async def test_a_client_closing_mid_record_or_mid_body(
    tmp_path: Path, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    async with harness(tmp_path, certs) as h:
        where = address(h)
        request = b"POST /cut HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n" + b"x" * 10
        await trio.to_thread.run_sync(_tls_bytes, where, certs, 20, request)
        await trio.to_thread.run_sync(_tls_bytes, where, certs, -1, request)
        status = await trio.to_thread.run_sync(
            lambda: _handshake(where, certs.client_context(), server_hostname="127.0.0.1")
        )
        assert status == "HTTP/1.1 200 OK"
        assert [r.path for r in h.upstream.requests] == ["/x"] or all(
            len(r.body) < 100 for r in h.upstream.requests if r.path == "/cut"
        )
    no_tracebacks(caplog)


# -- big bodies, pipelining, keep-alive ----------------------------------------


async def _big(request: RecordedRequest) -> FakeResponse:
    if request.path == "/big":
        return FakeResponse(200, [("content-type", "application/octet-stream")], BIG)
    return FakeResponse(200, [], str(len(request.body)).encode())


BIG = bytes(range(256)) * (8 * 4096)  # 8 MiB


async def test_big_bodies_both_ways_and_a_slow_reader(
    tmp_path: Path, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenSSL's rule after "want write": the same bytes again. The slow
    reader makes the gateway's writes want-write (counted, so the test
    knows it went that way) and every byte must arrive in order."""
    wants = [0]
    send = TLSSocket.send

    def counting(self: TLSSocket, data: Any, flags: int = 0) -> int:
        try:
            return send(self, data, flags)
        except BlockingIOError:
            wants[0] += 1
            raise

    monkeypatch.setattr(TLSSocket, "send", counting)
    upstream = FakeUpstream(handler=_big)
    async with harness(tmp_path, certs, upstream) as h:
        async with httpx.AsyncClient(
            base_url=h.info.proxy_url, verify=certs.client_context(), timeout=30
        ) as client:
            upload = bytes(range(251)) * 40000  # ~10 MB
            r = await client.post("/up", content=upload)
            assert r.status_code == 200 and r.text == str(len(upload))
            r = await client.get("/big")
            assert r.content == BIG

        def slow() -> bytes:
            with (
                socket.create_connection(address(h), timeout=30) as raw,
                certs.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls,
            ):
                tls.sendall(b"GET /big HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                data = bytearray()
                for i in range(100000):
                    chunk = tls.recv(16384)
                    if not chunk:
                        break
                    data += chunk
                    if i % 64 == 0:
                        time.sleep(0.01)  # the gateway's writes want-write often
                return bytes(data)

        data = await trio.to_thread.run_sync(slow)
        assert data.endswith(BIG), (len(data), len(BIG), data[:300])
        assert wants[0] > 0


async def test_pipelined_requests_in_one_record_and_long_keep_alive(
    tmp_path: Path, certs: Certs
) -> None:
    async with harness(tmp_path, certs) as h:

        def pipelined() -> bytes:
            with (
                socket.create_connection(address(h), timeout=10) as raw,
                certs.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls,
            ):
                one = (
                    b"".join(b"GET /p%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(20))
                    + b"GET /last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                )
                tls.sendall(one)  # one write: one record
                data = b""
                for _ in range(1000):
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                return data

        data = await trio.to_thread.run_sync(pipelined)
        assert data.count(b"HTTP/1.1 200 OK\r\n") == 21, data[-300:]
        assert [r.path for r in h.upstream.requests][-1] == "/last"
        async with httpx.AsyncClient(
            base_url=h.info.proxy_url, verify=certs.client_context(), timeout=10
        ) as client:
            for i in range(300):
                assert (await client.get(f"/k{i}")).status_code == 200
        assert listener(h).statistics().accepted == 2


# -- files -------------------------------------------------------------------


def test_an_encrypted_key_is_a_clear_error_never_a_prompt(certs: Certs, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(certs.key_file.read_bytes(), None)
    encrypted = tmp_path / "k.pem"  # no hint in the name
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    tls = ServerTLSConfig(cert_file=str(certs.cert_file), key_file=str(encrypted))
    with pytest.raises(ConfigError) as err:
        server_context(tls)
    text = "; ".join(err.value.lines())
    assert "server.tls.key_file" in text and str(encrypted) in text
    assert "passphrase" in text, text


def test_directories_instead_of_files_are_named(certs: Certs, tmp_path: Path) -> None:
    for fields in ({"cert_file": str(tmp_path)}, {"key_file": str(tmp_path)}):
        tls = ServerTLSConfig(
            **{"cert_file": str(certs.cert_file), "key_file": str(certs.key_file), **fields}
        )
        with pytest.raises(ConfigError) as err:
            server_context(tls)
        assert str(tmp_path) in "; ".join(err.value.lines())


async def test_a_client_that_rejects_the_certificate_is_no_traceback(
    tmp_path: Path, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    """With TLS 1.3 the server finishes its handshake before the client's
    "unknown CA" alert arrives: the alert is read as the first request."""
    async with harness(tmp_path, certs) as h:
        stranger = make_certs(tmp_path / "other")
        with pytest.raises(ssl.SSLCertVerificationError):
            await trio.to_thread.run_sync(
                lambda: _handshake(
                    address(h), stranger.client_context(), server_hostname="127.0.0.1"
                )
            )
        status = await trio.to_thread.run_sync(
            lambda: _handshake(address(h), certs.client_context(), server_hostname="127.0.0.1")
        )
        assert status == "HTTP/1.1 200 OK"
    no_tracebacks(caplog)


# -- https upstreams: SNI, truncation ----------------------------------------


class ScriptedTLSUpstream:
    """An https upstream that records each connection's SNI and answers
    every request with ``answer`` (raw bytes), then ends the connection
    with a close_notify (``clean``) or a bare TCP FIN (a truncation)."""

    def __init__(self, certs: Certs, answer: bytes, *, clean: bool) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(certs.cert_file), str(certs.key_file))
        self.names: list[str | None] = []
        self.context.sni_callback = lambda _sock, name, _ctx: self.names.append(name)
        self.answer = answer
        self.clean = clean
        self.listen = socket.create_server(("127.0.0.1", 0))
        self.port = self.listen.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listen.accept()
            except OSError:
                return
            try:
                raw.settimeout(10)
                tls = self.context.wrap_socket(raw, server_side=True)
                data = b""
                for _ in range(100):
                    if b"\r\n\r\n" in data:
                        break
                    data += tls.recv(65536)
                tls.sendall(self.answer)
                if self.clean:
                    tls.unwrap().close()
                else:
                    tls.close()  # the descriptor only: no close_notify
            except (OSError, ssl.SSLError):
                raw.close()

    def close(self) -> None:
        self.listen.close()


async def test_sni_is_sent_for_names_and_never_for_ip_literals(
    tmp_path: Path, certs: Certs
) -> None:
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
    up = ScriptedTLSUpstream(certs, answer, clean=True)
    try:
        for i, host in enumerate(("127.0.0.1", "localhost")):
            settings = {"targets": [f"https://{host}:{up.port}"], "ca_file": str(certs.ca_file)}
            async with open_harness(tmp_path / str(i), upstream_settings=settings) as h:
                r = await h.client.get("/sni")
                assert r.status_code == 200 and r.text == "ok", r.text
        # RFC 6066 section 3: no IP literal in server_name.
        assert up.names == [None, "localhost"]
    finally:
        up.close()


async def test_a_truncated_close_delimited_upstream_answer_is_not_complete(
    tmp_path: Path, certs: Certs
) -> None:
    """RFC 9112 section 9.8: an answer with neither Content-Length nor
    chunking is complete over TLS only with a close_notify; a bare FIN
    (an attacker on the path can forge one) is a truncation."""
    answer = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\npart of the body"
    for clean in (True, False):
        up = ScriptedTLSUpstream(certs, answer, clean=clean)
        try:
            settings = {"targets": [f"https://127.0.0.1:{up.port}"], "ca_file": str(certs.ca_file)}
            async with open_harness(tmp_path / str(clean), upstream_settings=settings) as h:
                try:
                    r = await h.client.get("/cut")
                except httpx.TransportError:
                    assert not clean, "a clean close_notify ends the body"
                    continue
                if clean:
                    assert r.status_code == 200 and r.text == "part of the body"
                else:
                    assert_problem(r, 502, "BAD_GATEWAY")
        finally:
            up.close()


async def test_a_client_that_resets_before_the_handshake_is_closed_not_collected(
    tmp_path: Path, certs: Certs
) -> None:
    """A connection reset before the gateway wraps it: ``SSLSocket`` then
    probes the unconnected socket with ``recv`` (which ``TLSSocket``
    overrides); the socket must be closed by the gateway, not left to the
    garbage collector ("unclosed <TLSSocket>")."""
    async with harness(tmp_path, certs) as h:
        where = address(h)

        def resets(n: int) -> None:
            for _ in range(n):
                sock = socket.create_connection(where, timeout=10)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            await trio.to_thread.run_sync(resets, 20)
            for _ in range(500):
                stats = listener(h).statistics()
                if stats.accepted >= 20 and stats.connections == 0:
                    break
                await trio.sleep(0.01)
            gc.collect()
        unclosed = [str(w.message) for w in caught if "TLSSocket" in str(w.message)]
        assert not unclosed, unclosed
        status = await trio.to_thread.run_sync(
            lambda: _handshake(where, certs.client_context(), server_hostname="127.0.0.1")
        )
        assert status == "HTTP/1.1 200 OK"


def test_an_unreadable_key_is_permission_denied_by_name(certs: Certs) -> None:
    """Run as an unprivileged user (the tests run as root, who reads
    anything): the key file's mode keeps it out."""
    setpriv = shutil.which("setpriv")
    assert setpriv, "install util-linux (setpriv)"
    assert os.geteuid() == 0, "this test drops root privileges with setpriv: run it as root"
    # Outside pytest's tmp_path, whose parents only root may enter.
    directory = Path(tempfile.mkdtemp(prefix="triogate-review-"))
    directory.chmod(0o755)
    cert = directory / "cert.pem"
    key = directory / "key.pem"
    shutil.copyfile(certs.cert_file, cert)
    shutil.copyfile(certs.key_file, key)
    cert.chmod(0o644)
    key.chmod(0o600)
    script = (
        "from triogate.config_tls import ServerTLSConfig, server_context\n"
        "from triogate.errors import ConfigError\n"
        f"tls = ServerTLSConfig(cert_file={str(cert)!r}, key_file={str(key)!r})\n"
        "try:\n"
        "    server_context(tls)\n"
        "except ConfigError as exc:\n"
        "    print('; '.join(exc.lines()))\n"
    )
    try:
        drop = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
        out = subprocess.run(
            [*drop, sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )
    finally:
        shutil.rmtree(directory)
    assert out.stdout.strip() == (
        f"server.tls.key_file: cannot use key file {str(key)!r}: permission denied"
    ), out.stdout + out.stderr
