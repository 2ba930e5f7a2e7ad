"""Certificates reloaded live, through the real ``triogate serve``: SIGHUP
re-reads the files (same names, new contents); new connections get the new
certificate while a kept-alive TLS connection goes on; a reload with a key
that does not match is refused with the file named and the old certificate
keeps serving. The same through ``POST /config/reload`` (in process)."""

from __future__ import annotations

import http.client
import re
import shutil
import signal
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from tests.helpers_process import serving, threaded_upstream, write_config
from tests.helpers_tls import Certs, make_certs
from tests.test_reload import config_doc, route, serve_file, upstreams, write_doc
from triogate.testing import FakeUpstream

PROXY_HTTPS = re.compile(r"^triogate: proxy listening on https://(\S+?):(\d+)")


def _proxy(lines: list[str]) -> tuple[str, int]:
    for line in lines:
        m = PROXY_HTTPS.match(line)
        if m:
            return m.group(1), int(m.group(2))
    raise AssertionError(f"no https proxy line in {lines}")


def _get(conn: http.client.HTTPSConnection, path: str) -> tuple[int, bytes]:
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read()


def _fresh(where: tuple[str, int], certs: Certs) -> int:
    conn = http.client.HTTPSConnection(*where, context=certs.client_context(), timeout=10)
    try:
        return _get(conn, "/fresh")[0]
    finally:
        conn.close()


def _until(check: Callable[[], bool], what: str) -> None:
    for _ in range(200):  # 20 s at most
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within 20 s: {what}")


def _install(certs: Certs, cert: Path, key: Path) -> None:
    shutil.copyfile(certs.cert_file, cert)
    shutil.copyfile(certs.key_file, key)


def test_sighup_reloads_certificates_without_dropping_connections(tmp_path: Path) -> None:
    first = make_certs(tmp_path / "first")
    second = make_certs(tmp_path / "second")
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    _install(first, cert, key)
    with threaded_upstream() as upstream_url:
        path = write_config(tmp_path / "tls.toml", tmp_path / "data")
        path.write_text(
            path.read_text()
            + f'\n[server.tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n'
            + f'\n[upstreams.up]\ntargets = ["{upstream_url}"]\n'
            + '\n[[routes]]\nname = "all"\npath = "/{rest:path}"\nupstream = "up"\n'
        )
        with serving(path) as sp:
            where = _proxy(sp.stdout_lines)
            kept = http.client.HTTPSConnection(*where, context=first.client_context(), timeout=10)
            assert _get(kept, "/before") == (200, b"ok")
            sock = kept.sock

            _install(second, cert, key)
            sp.proc.send_signal(signal.SIGHUP)

            def second_served() -> bool:
                try:
                    return _fresh(where, second) == 200
                except ssl.SSLError:
                    return False

            _until(second_served, "new connections get the new certificate")
            with pytest.raises(ssl.SSLCertVerificationError):
                _fresh(where, first)
            # The connection made before the reload goes on, on its socket.
            assert _get(kept, "/after") == (200, b"ok")
            assert kept.sock is sock
            kept.close()

            # A key that does not match: refused, named, the old pair serves on.
            shutil.copyfile(first.key_file, key)
            sp.proc.send_signal(signal.SIGHUP)
            _until(lambda: str(key) in sp.stderr(), "the refused reload is logged")
            assert "server.tls.key_file" in sp.stderr()
            assert _fresh(where, second) == 200
            assert sp.stop() == 0
        assert "Traceback" not in sp.stderr()


def _issuer_of(where: tuple[str, int], certs: Certs) -> bool:
    """Does the listener now present a certificate ``certs``' CA signed?"""
    try:
        return _fresh(where, certs) == 200
    except ssl.SSLError:
        return False


async def test_post_config_reload_takes_new_certificates_and_refuses_bad_ones(
    tmp_path: Path,
) -> None:
    first = make_certs(tmp_path / "first")
    second = make_certs(tmp_path / "second")
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    _install(first, cert, key)
    up = FakeUpstream()
    async with upstreams(up):
        doc = config_doc(
            tmp_path / "data",
            {"up": up.url},
            [route("all", "/{rest:path}", "up")],
            server={"tls": {"cert_file": str(cert), "key_file": str(key)}},
        )
        cfg = write_doc(tmp_path / "gw.toml", doc)
        async with serve_file(cfg) as live:
            host, _, port = live.info.proxy_url.removeprefix("https://").rpartition(":")
            where = (host, int(port))
            assert await trio.to_thread.run_sync(_issuer_of, where, first)
            # A key that does not match: 400 naming the file; nothing changes.
            shutil.copyfile(second.key_file, key)
            r = await live.reload()
            assert r.status_code == 400, r.text
            assert str(key) in r.text and "server.tls.key_file" in r.text
            assert await trio.to_thread.run_sync(_issuer_of, where, first)
            # The renewed pair, under the same names: taken by the reload.
            shutil.copyfile(second.cert_file, cert)
            r = await live.reload()
            assert r.status_code == 200, r.text
            assert await trio.to_thread.run_sync(_issuer_of, where, second)
            assert not await trio.to_thread.run_sync(_issuer_of, where, first)
