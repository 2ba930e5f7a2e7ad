"""WebSocket handshakes as a proxy sees them (RFC 6455 §4), sans-IO.

The gateway checks the client's opening handshake itself (so a malformed
one never costs an upstream connection, nor the key's limits), forwards it
with the two hop-by-hop headers that make it an upgrade put back, and checks
that the upstream's ``101`` really switched to WebSocket for *this* key
(``Sec-WebSocket-Accept``) before it relays a byte of the new protocol.

``Sec-WebSocket-Protocol`` and ``Sec-WebSocket-Extensions`` are not hop-by-hop:
they pass through both ways untouched, so the client and the upstream agree
on subprotocols and compression (permessage-deflate) end to end; the relay
never decodes payloads (``wsframes``), so it need not understand them.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import Final

from wsproto.utilities import generate_accept_token

from triogate.errors import InvalidWebSocketHandshake

__all__ = [
    "UPGRADE_LINES",
    "VERSION",
    "accept_token",
    "check_client_handshake",
    "is_websocket_upgrade",
    "switch_problem",
    "upgrade_request_head",
]

VERSION: Final = b"13"
# What turns a forwarded GET into the upgrade again (the front door removed
# ``Connection`` and what it names, as a proxy must, before any plugin ran).
UPGRADE_LINES: Final = b"connection: upgrade\r\nupgrade: websocket\r\n"
KEY_BYTES: Final = 16


def _tokens(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> set[bytes]:
    """The comma-separated tokens of every ``name`` field, lower-cased."""
    out: set[bytes] = set()
    for key, value in headers:
        if key == name:
            out.update(t.strip().lower() for t in value.split(b","))
    return out


def _values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key == name]


def is_websocket_upgrade(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """``Upgrade: websocket`` with ``Connection: upgrade`` (names lower-case,
    as the parser gives them): the request asks for a WebSocket. Any other
    upgrade (``h2c``, ``CONNECT``) is not one."""
    headers = list(headers)
    return b"websocket" in _tokens(headers, b"upgrade") and b"upgrade" in _tokens(
        headers, b"connection"
    )


def _valid_key(value: bytes) -> bool:
    value = value.strip()
    if len(value) != 24:  # 16 bytes in base64, padded
        return False
    try:
        return len(base64.b64decode(value, validate=True)) == KEY_BYTES
    except (binascii.Error, ValueError):
        return False


def check_client_handshake(
    method: str, version: str, headers: Iterable[tuple[bytes, bytes]], body_bytes: int
) -> bytes:
    """The client's ``Sec-WebSocket-Key`` (stripped) when its opening
    handshake is one RFC 6455 §4.1 allows, else ``InvalidWebSocketHandshake``
    (400 ``INVALID_WEBSOCKET_HANDSHAKE``; a wrong version also says which
    one the gateway speaks, in ``Sec-WebSocket-Version``, §4.4)."""
    headers = list(headers)
    if method != "GET":
        raise InvalidWebSocketHandshake("a WebSocket handshake is a GET request")
    if version != "1.1":
        raise InvalidWebSocketHandshake("a WebSocket handshake needs HTTP/1.1")
    if body_bytes or any(
        k == b"transfer-encoding" or (k == b"content-length" and v.strip() != b"0")
        for k, v in headers
    ):
        raise InvalidWebSocketHandshake("a WebSocket handshake has no body")
    keys = _values(headers, b"sec-websocket-key")
    if len(keys) != 1 or not _valid_key(keys[0]):
        raise InvalidWebSocketHandshake(
            "Sec-WebSocket-Key must be one header: 16 bytes in base64 (RFC 6455 §4.1)"
        )
    versions = _values(headers, b"sec-websocket-version")
    if len(versions) != 1 or versions[0].strip() != VERSION:
        error = InvalidWebSocketHandshake("Sec-WebSocket-Version must be 13 (RFC 6455)")
        error.headers["Sec-WebSocket-Version"] = VERSION.decode("ascii")
        raise error
    return keys[0].strip()


def accept_token(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for a client's key (RFC 6455 §4.2.2)."""
    return generate_accept_token(key)


def upgrade_request_head(head: bytes) -> bytes:
    """A forwarded request head (``h1client.proxy_request_head``, no body)
    made into the upgrade: the ``Connection`` and ``Upgrade`` lines added
    before the blank line that ends it."""
    if not head.endswith(b"\r\n\r\n"):
        raise ValueError("not a complete request head without a body")
    return head[:-2] + UPGRADE_LINES + b"\r\n"


def switch_problem(headers: Iterable[tuple[bytes, bytes]], key: bytes) -> str | None:
    """None when an upstream's ``101`` switched to WebSocket for ``key``,
    else what is wrong with it (the gateway answers 502 and relays nothing)."""
    headers = list(headers)
    if b"websocket" not in _tokens(headers, b"upgrade"):
        return "the upstream switched to another protocol than WebSocket"
    if b"upgrade" not in _tokens(headers, b"connection"):
        return "the upstream's 101 has no Connection: upgrade"
    accepts = _values(headers, b"sec-websocket-accept")
    if len(accepts) != 1 or accepts[0].strip() != accept_token(key):
        return "the upstream's Sec-WebSocket-Accept does not match the key"
    return None
