"""The WebSocket parts that decide without I/O: the handshake checks
(core/http/wshandshake.py), the frame tracker and the gateway's close frames
(core/http/wsframes.py), the route setting (core/config_websocket.py), the
counts (core/dataplane/wsstats.py). Frames are made by wsproto, the library
the endpoints use, so the tracker is checked against real encodings."""

from __future__ import annotations

import base64

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage

from triogate.config import parse_config
from triogate.config_websocket import DEFAULT_WEBSOCKET, WebSocketConfig, websocket_settings
from triogate.dataplane.wsstats import WebSocketStats
from triogate.errors import ConfigError, InvalidWebSocketHandshake
from triogate.http.wsframes import FrameTracker, close_frame
from triogate.http.wshandshake import (
    accept_token,
    check_client_handshake,
    is_websocket_upgrade,
    switch_problem,
    upgrade_request_head,
)

KEY = base64.b64encode(b"0123456789abcdef")


def handshake(**override: bytes | None) -> list[tuple[bytes, bytes]]:
    fields = {
        b"host": b"a",
        b"upgrade": b"websocket",
        b"connection": b"Upgrade",
        b"sec-websocket-key": KEY,
        b"sec-websocket-version": b"13",
    }
    for name, value in override.items():
        key = name.replace("_", "-").encode()
        if value is None:
            fields.pop(key)
        else:
            fields[key] = value
    return list(fields.items())


# ---- the handshake ----------------------------------------------------------------------------


def test_a_websocket_upgrade_is_told_from_other_upgrades() -> None:
    assert is_websocket_upgrade(handshake())
    assert is_websocket_upgrade(handshake(connection=b"keep-alive, Upgrade", upgrade=b"WebSocket"))
    assert not is_websocket_upgrade(handshake(upgrade=b"h2c"))
    assert not is_websocket_upgrade(handshake(connection=b"keep-alive"))
    assert not is_websocket_upgrade(handshake(upgrade=None))


def test_a_valid_handshake_gives_its_key() -> None:
    assert check_client_handshake("GET", "1.1", handshake(), 0) == KEY
    assert check_client_handshake("GET", "1.1", handshake(sec_websocket_key=KEY + b" "), 0) == KEY


@pytest.mark.parametrize(
    "key",
    [
        None,
        b"",
        b"not base64 at all!!!!!!!",
        base64.b64encode(b"fifteen bytes..") + b"=",  # 15 bytes
        base64.b64encode(b"seventeen bytes!!"),
        base64.b64encode(b"0123456789abcdef")[:-2] + b"!!",
    ],
)
def test_a_wrong_key_is_refused(key: bytes | None) -> None:
    with pytest.raises(InvalidWebSocketHandshake, match="Sec-WebSocket-Key"):
        check_client_handshake("GET", "1.1", handshake(sec_websocket_key=key), 0)


def test_two_keys_are_refused() -> None:
    with pytest.raises(InvalidWebSocketHandshake):
        check_client_handshake("GET", "1.1", [*handshake(), (b"sec-websocket-key", KEY)], 0)


@pytest.mark.parametrize("version", [None, b"8", b"12", b"14", b"13, 8", b""])
def test_another_version_is_refused_naming_13(version: bytes | None) -> None:
    with pytest.raises(InvalidWebSocketHandshake) as caught:
        check_client_handshake("GET", "1.1", handshake(sec_websocket_version=version), 0)
    assert caught.value.status == 400
    assert caught.value.code == "INVALID_WEBSOCKET_HANDSHAKE"
    assert caught.value.headers == {"Sec-WebSocket-Version": "13"}


@pytest.mark.parametrize(
    ("method", "version", "extra", "body"),
    [
        ("POST", "1.1", [], 0),
        ("GET", "1.0", [], 0),
        ("GET", "1.1", [(b"content-length", b"3")], 0),
        ("GET", "1.1", [(b"transfer-encoding", b"chunked")], 0),
        ("GET", "1.1", [], 5),
    ],
)
def test_not_a_bodiless_http11_get_is_refused(
    method: str, version: str, extra: list[tuple[bytes, bytes]], body: int
) -> None:
    with pytest.raises(InvalidWebSocketHandshake):
        check_client_handshake(method, version, [*handshake(), *extra], body)


def test_the_upgrade_head_ends_with_the_upgrade_lines() -> None:
    head = b"GET /x HTTP/1.1\r\nhost: a\r\nx-request-id: r\r\n\r\n"
    assert upgrade_request_head(head) == (
        b"GET /x HTTP/1.1\r\nhost: a\r\nx-request-id: r\r\n"
        b"connection: upgrade\r\nupgrade: websocket\r\n\r\n"
    )
    with pytest.raises(ValueError):
        upgrade_request_head(b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc")


def test_the_upstreams_switch_is_checked_against_the_key() -> None:
    good = [
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", accept_token(KEY)),
    ]
    assert switch_problem(good, KEY) is None
    assert accept_token(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    wrong = [*good[:2], (b"sec-websocket-accept", accept_token(b"x" * 24))]
    assert "Accept" in (switch_problem(wrong, KEY) or "")
    assert switch_problem([(b"upgrade", b"h2c"), *good[1:]], KEY) is not None
    assert switch_problem([good[0], good[2]], KEY) is not None
    assert switch_problem(good[:2], KEY) is not None


# ---- frames -----------------------------------------------------------------------------------


def frames(client: bool) -> bytes:
    """A stream of real frames: small, 126-byte (16-bit length), 70 000-byte
    (64-bit length), fragmented, control frames; masked from a client."""
    conn = Connection(ConnectionType.CLIENT if client else ConnectionType.SERVER)
    out = b""
    out += conn.send(Message(data="hi"))
    out += conn.send(Message(data=b"x" * 126))
    out += conn.send(Message(data=b"y" * 70000))
    out += conn.send(Message(data="part", message_finished=False))
    out += conn.send(Ping(payload=b"p"))
    out += conn.send(Message(data="rest"))
    out += conn.send(Message(data=b""))
    return out


@pytest.mark.parametrize("client", [True, False], ids=["masked", "unmasked"])
def test_the_tracker_forwards_every_byte_whatever_the_reads(client: bool) -> None:
    stream = frames(client)
    for cut in [1, 2, 3, 7, 13, 100, 1000, 65536]:
        tracker = FrameTracker(max_payload=100000)
        out = b""
        for start in range(0, len(stream), cut):
            forward, too_big = tracker.feed(stream[start : start + cut])
            assert too_big is None
            out += forward
        assert out == stream, cut
        assert tracker.at_boundary
        assert tracker.frames == 7
        assert not tracker.close_seen


def test_the_tracker_is_mid_frame_inside_a_payload() -> None:
    stream = Connection(ConnectionType.SERVER).send(Message(data=b"z" * 1000))
    tracker = FrameTracker(max_payload=5000)
    assert tracker.feed(stream[:500]) == (stream[:500], None)
    assert not tracker.at_boundary
    assert tracker.feed(stream[500:]) == (stream[500:], None)
    assert tracker.at_boundary


def test_a_header_cut_by_a_read_is_held_back_until_whole() -> None:
    stream = Connection(ConnectionType.CLIENT).send(Message(data=b"z" * 300))
    tracker = FrameTracker(max_payload=5000)
    assert tracker.feed(stream[:3]) == (b"", None)  # 2 + 2 length + 4 mask: 8 bytes
    assert not tracker.at_boundary
    forward, _ = tracker.feed(stream[3:])
    assert forward == stream


def test_a_frame_over_the_cap_stops_before_its_first_byte() -> None:
    conn = Connection(ConnectionType.CLIENT)
    small = conn.send(Message(data="ok"))
    big = conn.send(Message(data=b"b" * 2000))
    tracker = FrameTracker(max_payload=1000)
    assert tracker.feed(small + big[:40]) == (small, 2000)
    # Cut inside its header: nothing of it goes either.
    tracker = FrameTracker(max_payload=1000)
    assert tracker.feed(small + big[:3]) == (small, None)
    assert tracker.feed(big[3:10]) == (b"", 2000)
    # Exactly the cap is allowed; a 64-bit length is read as one.
    tracker = FrameTracker(max_payload=70000)
    huge = conn.send(Message(data=b"h" * 70001))
    assert tracker.feed(huge[:20]) == (b"", 70001)


def test_a_close_frame_going_by_is_seen() -> None:
    conn = Connection(ConnectionType.SERVER)
    tracker = FrameTracker(max_payload=1000)
    tracker.feed(conn.send(Message(data="bye")))
    assert not tracker.close_seen
    tracker.feed(conn.send(CloseConnection(code=1000, reason="done")))
    assert tracker.close_seen and tracker.at_boundary


@pytest.mark.parametrize(("to_server", "masked"), [(True, True), (False, False)])
def test_the_gateways_close_frames_decode_as_such(to_server: bool, masked: bool) -> None:
    frame = close_frame(1001, "going away", to_server=to_server)
    assert bool(frame[1] & 0x80) is masked  # toward the upstream: masked (RFC 6455 §5.1)
    reader = Connection(ConnectionType.SERVER if to_server else ConnectionType.CLIENT)
    reader.receive_data(frame)
    (event,) = list(reader.events())
    assert isinstance(event, CloseConnection)
    assert (event.code, event.reason) == (1001, "going away")


def test_wsproto_messages_types_are_what_the_tests_expect() -> None:
    # The integration tests compare TextMessage and BytesMessage data.
    reader = Connection(ConnectionType.SERVER)
    reader.receive_data(Connection(ConnectionType.CLIENT).send(Message(data=b"\x00")))
    (event,) = list(reader.events())
    assert isinstance(event, BytesMessage) and not isinstance(event, TextMessage)


# ---- the route setting and the counts ----------------------------------------------------------


def config(websocket: object) -> dict[str, object]:
    route: dict[str, object] = {"name": "r", "path": "/r", "upstream": "u"}
    if websocket is not None:
        route["websocket"] = websocket
    return {"upstreams": {"u": {"targets": ["http://127.0.0.1:9"]}}, "routes": [route]}


def test_websocket_is_on_by_default_off_by_false_tuned_by_a_table() -> None:
    (route,) = parse_config(config(None), environ={}).routes
    assert websocket_settings(route.websocket) is DEFAULT_WEBSOCKET
    (route,) = parse_config(config(False), environ={}).routes
    assert websocket_settings(route.websocket) is None
    (route,) = parse_config(config({"idle_timeout_seconds": 2}), environ={}).routes
    assert websocket_settings(route.websocket) == WebSocketConfig(idle_timeout_seconds=2.0)


@pytest.mark.parametrize(
    "bad", [{"idle_timeout_seconds": 0}, {"max_frame_bytes": 10}, {"nope": 1}, "yes"]
)
def test_bad_websocket_settings_are_config_errors(bad: object) -> None:
    with pytest.raises(ConfigError):
        parse_config(config(bad), environ={})


def test_upgrades_are_counted_by_outcome() -> None:
    stats = WebSocketStats()
    stats.answered(101, False)
    stats.answered(401, True)
    stats.answered(400, True)
    stats.answered(502, True)
    stats.answered(403, False)
    assert stats.upgrades == {"upgraded": 1, "refused": 2, "failed": 1, "declined": 1}
