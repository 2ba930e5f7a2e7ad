"""WebSocket frames as the relay needs them (RFC 6455 §5.2), sans-IO.

The relay pipes bytes; it does not decode messages. Why not run wsproto on
each direction: that would unmask, reassemble and re-encode (and re-mask
toward the upstream) every byte of every message, several times the cost of
the copy the relay makes anyway, and it would have to understand every
extension the two ends negotiated (permessage-deflate sets RSV1, which a
decoder without the extension refuses), so compression could not pass
through end to end. What the gateway must know is far less, and all of it
is in the frame headers: where each frame starts (so a close frame of its
own goes in between two frames, never inside one), how long it says it is
(the frame size cap, checked before a byte of an oversized frame is
forwarded) and whether a close frame went by (the close handshake is under
way). ``FrameTracker`` reads exactly that and skips the payloads without
touching them. The validity of what is inside (UTF-8 in text frames,
masking, control frame rules) stays the two endpoints' business, as with
any proxy.

wsproto writes the frames the gateway sends itself (``close_frame``): the
close frames on drain, idle timeout and an oversized frame.
"""

from __future__ import annotations

from typing import Final

from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection

__all__ = [
    "GOING_AWAY",
    "MESSAGE_TOO_BIG",
    "FrameTracker",
    "close_frame",
]

GOING_AWAY: Final = 1001  # shutdown, drain, idle timeout
MESSAGE_TOO_BIG: Final = 1009  # a frame over the cap
OPCODE_CLOSE: Final = 0x8


class FrameTracker:
    """Follows the frame boundaries of one direction of a connection from
    the frame headers alone, payloads skipped unread.

    ``feed(data)`` gives back what may be forwarded now: ``data`` itself in
    the common case (no copy); without a frame header cut by the end of the
    read (held back until it is whole, at most 13 bytes, so the frame size
    cap is known before any byte of a frame goes on); and when a frame
    declares a payload over ``max_payload``, only the bytes before it, with
    that length (then nothing more is to be forwarded)."""

    __slots__ = ("_held", "_left", "close_seen", "frames", "max_payload")

    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload
        self._held = b""  # the start of a header cut by the end of a read
        self._left = 0  # payload bytes of the current frame still to come
        self.close_seen = False  # a close frame went by
        self.frames = 0  # frame headers seen

    @property
    def at_boundary(self) -> bool:
        """What was forwarded ends between two frames: a frame of the
        gateway's own may go next."""
        return self._left == 0 and not self._held

    def feed(self, data: bytes) -> tuple[bytes, int | None]:
        if self._held:
            data = self._held + data
            self._held = b""
        size = len(data)
        i = 0
        while True:
            left = self._left
            if left:
                step = min(left, size - i)
                i += step
                self._left = left - step
                if self._left:
                    return data, None  # the read ends inside a payload
            if i >= size:
                return data, None
            if size - i < 2:
                return self._hold(data, i)
            second = data[i + 1]
            length = second & 0x7F
            head = 2 + (2 if length == 126 else 8 if length == 127 else 0)
            if second & 0x80:
                head += 4  # the masking key
            if size - i < head:
                return self._hold(data, i)
            if length == 126:
                length = int.from_bytes(data[i + 2 : i + 4], "big")
            elif length == 127:
                length = int.from_bytes(data[i + 2 : i + 10], "big")
            if length > self.max_payload:
                return data[:i], length
            self.frames += 1
            if data[i] & 0x0F == OPCODE_CLOSE:
                self.close_seen = True
            i += head
            self._left = length

    def _hold(self, data: bytes, start: int) -> tuple[bytes, None]:
        self._held = data[start:]
        return data[:start], None


def close_frame(code: int, reason: str, *, to_server: bool) -> bytes:
    """A close frame of the gateway's own: masked toward the upstream (the
    gateway is its client), unmasked toward the client (RFC 6455 §5.1)."""
    side = ConnectionType.CLIENT if to_server else ConnectionType.SERVER
    return Connection(side).send(CloseConnection(code=code, reason=reason))
