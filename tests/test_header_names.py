"""Request header names with ``_``: a CGI or WSGI upstream reads ``X_Key_ID``
as ``HTTP_X_KEY_ID``, exactly like ``X-Key-ID``, the header the gateway uses
to say which key it checked. Such headers are dropped (as nginx does) unless
``server.underscores_in_headers`` is on, and even then never one that would
shadow a header the gateway sets. Unit and property tests on
``strip_connection_headers``, then both real front doors to a fake upstream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triogate.http import GATEWAY_SET, HOP_BY_HOP, Headers, strip_connection_headers
from triogate.http.h1client import NOT_FORWARDED, proxy_request_head
from triogate.testing import FakeUpstream, open_harness

SHADOWS: Final = [
    b"x_key_id",
    b"x-key_id",
    b"x_forwarded_for",
    b"x_forwarded_proto",
    b"x_forwarded_host",
    b"x_request_id",
    b"x_forwarded_port",  # every x-forwarded-*, not only the gateway's three
    b"x_forwarded_prefix",
    b"x_real_ip",
    b"x_original_url",
    b"x-rewrite_url",
    b"content_length",
    b"transfer_encoding",
    b"host_",  # not a shadow ('host-'), kept when allowed: checked below
]


def _strip(raw: list[tuple[bytes, bytes]], underscores: bool = False) -> list[tuple[bytes, bytes]]:
    headers = Headers(list(raw))
    strip_connection_headers(headers, underscores)
    return headers.raw


def test_the_shadow_list_covers_what_the_gateway_sets() -> None:
    assert NOT_FORWARDED | HOP_BY_HOP <= GATEWAY_SET
    head = proxy_request_head(
        "POST",
        "/",
        "upstream",
        Headers([(b"host", b"example.com")]),
        client_ip="192.0.2.1",
        scheme="http",
        request_id="r",
        key_id="key",
        body_length=None,
    )
    written = {line.split(b":", 1)[0] for line in head.split(b"\r\n")[1:] if line}
    assert written <= GATEWAY_SET


def test_underscore_names_are_dropped_by_default() -> None:
    raw = [
        (b"host", b"a"),
        (b"x_key_id", b"key_VICTIM"),
        (b"x-custom", b"1"),
        (b"x_custom", b"2"),
        (b"accept", b"*/*"),
    ]
    assert _strip(raw) == [(b"host", b"a"), (b"x-custom", b"1"), (b"accept", b"*/*")]


def test_with_the_switch_on_only_shadows_are_dropped() -> None:
    raw = [(b"x_custom", b"1"), *((name, b"v") for name in SHADOWS), (b"x-key-id", b"k")]
    assert _strip(raw, underscores=True) == [
        (b"x_custom", b"1"),
        (b"host_", b"v"),
        (b"x-key-id", b"k"),
    ]


def test_nothing_to_drop_keeps_the_same_list() -> None:
    headers = Headers([(b"host", b"a"), (b"accept", b"*/*"), (b"x-api-key", b"k")])
    before = headers.raw
    strip_connection_headers(headers)
    assert headers.raw is before
    headers = Headers([(b"host", b"a"), (b"x_custom", b"1")])
    before = headers.raw
    strip_connection_headers(headers, underscores=True)
    assert headers.raw is before


def test_connection_and_underscores_together() -> None:
    raw = [
        (b"connection", b"close, X-Drop , x_named"),
        (b"x-drop", b"1"),
        (b"x_named", b"2"),
        (b"x_other", b"3"),
        (b"keep", b"4"),
    ]
    assert _strip(raw) == [(b"keep", b"4")]
    assert _strip(raw, underscores=True) == [(b"x_other", b"3"), (b"keep", b"4")]


names = st.text(alphabet="abxyz-_", min_size=1, max_size=8).map(str.encode) | st.sampled_from(
    sorted(
        (GATEWAY_SET | {n.replace(b"-", b"_") for n in GATEWAY_SET} | {b"x_forwarded_port"})
        - {b"connection"}
    )
)


@settings(max_examples=500, deadline=None)
@given(st.lists(names, max_size=12), st.booleans())
def test_what_is_kept(names: list[bytes], underscores: bool) -> None:
    raw = [(name, b"%d" % i) for i, name in enumerate(names)]
    kept = _strip(raw, underscores)
    expected = [
        (k, v)
        for k, v in raw
        if b"_" not in k
        or (
            underscores
            and k.replace(b"_", b"-") not in GATEWAY_SET
            and not k.replace(b"_", b"-").startswith(b"x-forwarded-")
        )
    ]
    assert kept == expected  # order kept, nothing else touched


# ---- through the real front doors ----------------------------------------------


@pytest.mark.parametrize("door", ["native", "hypercorn"])
@pytest.mark.parametrize("underscores", [False, True])
async def test_the_upstream_never_sees_a_shadowing_header(
    tmp_path: Path, door: str, underscores: bool
) -> None:
    upstream = FakeUpstream()
    async with open_harness(
        tmp_path,
        upstream=upstream,
        plugins={"key-auth": {}},
        server={"proxy_server": door, "underscores_in_headers": underscores},
    ) as h:
        key = await h.create_key()
        r = await h.client.get(
            "/x",
            headers=[
                ("X-API-Key", key),
                ("X_Key_ID", "key_VICTIM"),
                ("X_Forwarded_For", "10.0.0.1"),
                ("X_Custom", "kept?"),
                ("X-Other", "kept"),
            ],
        )
        assert r.status_code == 200, r.text
        [seen] = upstream.requests
        names = [k for k, _ in seen.headers]
        assert "x_key_id" not in names
        assert "x_forwarded_for" not in names
        assert seen.header("x-key-id") not in (None, "key_VICTIM")
        assert seen.header("x-forwarded-for") == "127.0.0.1"
        assert seen.header("x-other") == "kept"
        assert seen.header("x_custom") == ("kept?" if underscores else None)


@pytest.mark.parametrize("door", ["native", "hypercorn"])
async def test_the_upstream_never_sees_what_only_a_proxy_may_say(tmp_path: Path, door: str) -> None:
    """``X-Forwarded-Port/-Prefix/-Server`` (and every other
    ``X-Forwarded-*``), ``X-Real-IP``, ``X-Original-URL`` and
    ``X-Rewrite-URL`` from a client: the upstream builds redirects and
    links, reads the client's address or even the path from them."""
    upstream = FakeUpstream()
    async with open_harness(
        tmp_path,
        upstream=upstream,
        server={"proxy_server": door, "underscores_in_headers": True},
    ) as h:
        r = await h.client.get(
            "/x",
            headers=[
                ("X-Forwarded-Port", "443"),
                ("X-Forwarded-Prefix", "/admin"),
                ("X-Forwarded-Server", "evil.example"),
                ("X-Forwarded-Ssl", "on"),
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "evil.example"),
                ("X-Real-IP", "10.0.0.1"),
                ("X-Original-URL", "/private/data"),
                ("X-Rewrite-URL", "/private/data"),
                ("X_Forwarded_Port", "443"),
                ("X_Real_IP", "10.0.0.1"),
                ("X-Other", "kept"),
            ],
        )
        assert r.status_code == 200, r.text
        [seen] = upstream.requests
        names = {k for k, _ in seen.headers}
        assert (
            not {
                "x-forwarded-port",
                "x-forwarded-prefix",
                "x-forwarded-server",
                "x-forwarded-ssl",
                "x-real-ip",
                "x-original-url",
                "x-rewrite-url",
                "x_forwarded_port",
                "x_real_ip",
            }
            & names
        )
        assert seen.header("x-forwarded-proto") == "http"  # the gateway's own
        assert seen.header("x-forwarded-host") != "evil.example"
        assert seen.header("x-other") == "kept"
        assert "evil.example" not in str(seen.headers)
