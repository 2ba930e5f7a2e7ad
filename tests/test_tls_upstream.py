"""https upstreams against a real TLS server on 127.0.0.1: verified with
``ca_file`` (SNI and the host name checked), connections pooled and kept
alive like plain ones, and every certificate that should not pass (untrusted
self-signed, expired, another host's name) answered 502
``UPSTREAM_TLS_ERROR``, counted and logged once, never a traceback;
``verify = false`` lets it through with a warning at start."""

from __future__ import annotations

import datetime
import logging
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from tests.helpers_gateway import assert_problem
from tests.helpers_tls import Certs, make_certs, tls_upstream
from triogate.config import HealthCheckConfig, UpstreamConfig
from triogate.dataplane import sockio
from triogate.dataplane.health import check_once
from triogate.dataplane.tls import client_context, handshake
from triogate.dataplane.upstream import Upstream
from triogate.testing import Harness, open_harness

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _stats(h: Harness) -> Any:
    assert h.server.gateway is not None
    (upstream,) = h.server.gateway.pipeline.upstreams.values()
    return upstream.statistics().targets[0]


async def test_a_verified_https_upstream_is_pooled(tmp_path: Path, certs: Certs) -> None:
    with tls_upstream(certs.cert_file, certs.key_file) as up:
        settings = {"targets": [up.url + "/base"], "ca_file": str(certs.ca_file)}
        async with open_harness(tmp_path, upstream_settings=settings) as h:
            for i in range(4):
                r = await h.client.get(f"/x/{i}")
                assert r.status_code == 200, r.text
                assert r.text == f"tls /base/x/{i}"
            # Four requests, one TLS connection: kept alive and reused.
            assert len(up.connections) == 1
            assert _stats(h).opened == 1 and _stats(h).tls_failures == 0
            port = up.url.rpartition(":")[2]
            assert up.seen[-1]["host"] == f"127.0.0.1:{port}"


async def test_sni_and_host_name_by_name(tmp_path: Path, certs: Certs) -> None:
    # "localhost" is in the certificate: the name (sent as SNI) is checked.
    with tls_upstream(certs.cert_file, certs.key_file) as up:
        port = up.url.rpartition(":")[2]
        settings = {"targets": [f"https://localhost:{port}"], "ca_file": str(certs.ca_file)}
        async with open_harness(tmp_path, upstream_settings=settings) as h:
            r = await h.client.get("/named")
            assert r.status_code == 200, r.text


def _bad(tmp_path: Path, kind: str, certs: Certs) -> tuple[Path, Path, dict[str, Any]]:
    """A certificate the gateway must refuse, and the upstream settings."""
    directory = tmp_path / kind
    directory.mkdir()
    if kind == "self-signed":
        # Another CA, not in the system store and not trusted: no ca_file.
        leaf = trustme.CA().issue_cert("127.0.0.1")
        settings: dict[str, Any] = {}
    elif kind == "expired":
        past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
        leaf = certs.ca.issue_cert(
            "127.0.0.1", not_before=past, not_after=past + datetime.timedelta(days=1)
        )
        settings = {"ca_file": str(certs.ca_file)}
    else:  # wrong host name
        leaf = certs.ca.issue_cert("other.example")
        settings = {"ca_file": str(certs.ca_file)}
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key, settings


@pytest.mark.parametrize("kind", ["self-signed", "expired", "wrong-host"])
async def test_a_bad_certificate_is_a_502_with_its_code(
    tmp_path: Path, certs: Certs, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key, settings = _bad(tmp_path, kind, certs)
    with tls_upstream(cert, key) as up:
        settings["targets"] = [up.url]
        async with open_harness(tmp_path / "gw", upstream_settings=settings) as h:
            for _ in range(2):
                r = await h.client.get("/refused")
                assert_problem(r, 502, "UPSTREAM_TLS_ERROR")
            assert _stats(h).tls_failures == 2
            assert h.server.gateway is not None
            scrape = h.server.gateway.metrics.render()[0].decode()
            counted = '{code="UPSTREAM_TLS_ERROR",upstream="test"} 2.0'
            assert f"triogate_upstream_errors_total{counted}" in scrape
            assert up.seen == []  # no request went over an unverified connection
    lines = [r for r in caplog.records if "TLS with upstream" in r.getMessage()]
    assert len(lines) == 2  # once per failure
    assert all("UPSTREAM_TLS_ERROR" in r.getMessage() for r in lines)
    assert all(r.levelno == logging.WARNING and not r.exc_info for r in lines)
    assert "certificate verify failed" in lines[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]


async def test_verify_false_lets_it_through_with_a_warning(
    tmp_path: Path, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key, _ = _bad(tmp_path, "self-signed", certs)
    with tls_upstream(cert, key) as up:
        settings = {"targets": [up.url], "verify": False}
        async with open_harness(tmp_path / "gw", upstream_settings=settings) as h:
            r = await h.client.get("/unverified")
            assert r.status_code == 200
    assert any("verify = false" in r.getMessage() for r in caplog.records)


async def test_health_probes_speak_tls(tmp_path: Path, certs: Certs) -> None:
    with tls_upstream(certs.cert_file, certs.key_file) as up:
        config = UpstreamConfig(targets=[up.url], ca_file=str(certs.ca_file))
        upstream = Upstream("probe", config)
        check = HealthCheckConfig(path="/health")
        assert await check_once(upstream.pools[0], check) is True
        untrusted = Upstream("probe2", UpstreamConfig(targets=[up.url]))
        assert await check_once(untrusted.pools[0], check) is False
        assert untrusted.pools[0].tls_failures == 1


async def test_a_pooled_tls_connection_closed_by_the_upstream_is_seen(certs: Certs) -> None:
    """``sockio.still_open`` on a TLS socket (the pool's check before reusing
    an idle connection): open while the upstream keeps it, not once the
    upstream closed it (its close_notify or FIN is readable)."""
    client_raw, server_raw = socket.socketpair()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(str(certs.cert_file), str(certs.key_file))
    server = server_context.wrap_socket(server_raw, server_side=True, do_handshake_on_connect=False)
    client_raw.setblocking(False)
    context = client_context(str(certs.ca_file), True, "upstreams.test")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, server.do_handshake)
        tls = await handshake(
            client_raw, context, trio.current_time() + 10, server_hostname="localhost"
        )
    try:
        # Nothing yet: "not yet", as a plain socket says. (This read also
        # takes in the TLS 1.3 session tickets the server sent after the
        # handshake, as reading an answer does: unread, their raw bytes
        # would make the connection look closed, and cost a new one.)
        for _ in range(100):
            with pytest.raises(BlockingIOError):
                tls.recv(100)
            if sockio.still_open(tls):
                break
            await trio.sleep(0.01)  # the tickets' second half still on its way
        assert sockio.still_open(tls)
        await trio.to_thread.run_sync(server.sendall, b"hello")
        assert await sockio.recv(tls, 100, trio.current_time() + 10) == b"hello"
        assert sockio.still_open(tls)
        await trio.to_thread.run_sync(server.close)
        assert not sockio.still_open(tls)
        # The server's close() sent no close_notify: towards an upstream a
        # bare FIN is an error, not a clean end (RFC 9112 section 9.8).
        with pytest.raises(ssl.SSLEOFError):
            await sockio.recv(tls, 100, trio.current_time() + 10)
    finally:
        sockio.close(tls)
