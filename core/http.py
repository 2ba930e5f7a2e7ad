"""The HTTP model every part of the data plane shares: headers, request,
response, and body streams. Transport-free: the native listener, the ASGI
adapter and the upstream client all produce and consume these.

Headers are kept as the bytes that came off the wire (names lower-cased),
because most of them pass through the gateway untouched: decoding and
re-encoding every header of every request would be pure overhead. The
``Headers`` methods take and give ``str`` for plugin authors.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Final

from triogate.errors import BadRequest

__all__ = [
    "HOP_BY_HOP",
    "Body",
    "ClientDisconnected",
    "Headers",
    "Request",
    "Response",
    "body_from_bytes",
    "check_target",
    "strip_connection_headers",
]

# RFC 9110 §7.6.1: connection-specific headers a proxy must not forward.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


class ClientDisconnected(Exception):
    """The client went away (mid-body, mid-response). Not an error of ours:
    nobody is left to answer, so every layer lets it through quietly."""


_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _normalize_escape(match: re.Match[bytes]) -> bytes:
    byte = int(match.group(1), 16)
    if byte in _UNRESERVED:
        return bytes([byte])  # %61 is 'a' for every upstream: route it as 'a'
    if byte in (0x2F, 0x5C, 0x00):  # '/', '\', NUL: ambiguous or dangerous
        raise BadRequest("encoded '/', '\\' or NUL in the path is not allowed")
    return b"%" + match.group(1).upper()


def strip_connection_headers(headers: Headers) -> None:
    """Remove ``Connection`` and every header it names, as a proxy must
    (RFC 9110 §7.6.1). Done by the front doors *before* any plugin runs, so
    a client cannot name (and so remove) a header a plugin adds upstream."""
    value = headers.get_raw(b"connection")
    if value is None:
        return
    named = {t.strip().lower() for t in value.split(b",") if t.strip()}
    named.add(b"connection")
    headers.raw = [(k, v) for k, v in headers.raw if k not in named]


def check_target(url: bytes) -> tuple[str, str]:
    """Split an origin-form request target into (path, query) and normalise
    the path the way an upstream will read it, so that what is routed (and
    authorised) is what is forwarded: percent-encoded unreserved characters
    are decoded (RFC 3986 §6.2.2.2) and other escapes upper-cased. Refused:
    absolute- and authority-form targets, ``.``/``..`` segments (also
    encoded, also with ``;params``), encoded ``/``, backslashes, NUL,
    non-ASCII. Both front doors call this before routing."""
    if not url.startswith(b"/"):
        raise BadRequest("only origin-form request targets (/path?query) are accepted")
    path, _, query = url.partition(b"?")
    if b"%" in path:
        path = _ESCAPE.sub(_normalize_escape, path)
    if b"\\" in path or b"\x00" in path:
        raise BadRequest("invalid characters in the path")
    for segment in path.split(b"/"):
        if segment.split(b";", 1)[0] in (b"..", b"."):
            raise BadRequest("'.' and '..' path segments are not allowed")
    try:
        return path.decode("ascii"), query.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("the request target must be ASCII (percent-encode the rest)") from None


class Headers:
    """An ordered multi-map of header fields, names lower-case."""

    __slots__ = ("raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]] | None = None) -> None:
        self.raw: list[tuple[bytes, bytes]] = [] if raw is None else raw

    @classmethod
    def of(cls, items: Iterable[tuple[str, str]]) -> Headers:
        return cls([(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in items])

    def __repr__(self) -> str:
        return f"Headers({self.items()!r})"

    def __len__(self) -> int:
        return len(self.raw)

    def __contains__(self, name: str) -> bool:
        key = name.lower().encode("latin-1")
        return any(k == key for k, _ in self.raw)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.items())

    def get_raw(self, name: bytes) -> bytes | None:
        """First value for a lower-case ``bytes`` name (the fast path)."""
        for k, v in self.raw:
            if k == name:
                return v
        return None

    def get(self, name: str, default: str | None = None) -> str | None:
        value = self.get_raw(name.lower().encode("latin-1"))
        return default if value is None else value.decode("latin-1")

    def get_all(self, name: str) -> list[str]:
        key = name.lower().encode("latin-1")
        return [v.decode("latin-1") for k, v in self.raw if k == key]

    def items(self) -> list[tuple[str, str]]:
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.raw]

    def remove(self, name: str) -> None:
        self.remove_raw(name.lower().encode("latin-1"))

    def remove_raw(self, name: bytes) -> None:
        self.raw = [(k, v) for k, v in self.raw if k != name]

    def set(self, name: str, value: str) -> None:
        """Replace every value of ``name`` with one."""
        key = name.lower().encode("latin-1")
        self.raw = [(k, v) for k, v in self.raw if k != key]
        self.raw.append((key, _checked(value)))

    def add(self, name: str, value: str) -> None:
        self.raw.append((name.lower().encode("latin-1"), _checked(value)))

    def rename(self, old: str, new: str) -> None:
        src = old.lower().encode("latin-1")
        dst = new.lower().encode("latin-1")
        self.raw = [(dst if k == src else k, v) for k, v in self.raw]

    def copy(self) -> Headers:
        return Headers(list(self.raw))


def _checked(value: str) -> bytes:
    # A plugin must not be able to inject a header (or a response) by
    # putting CR/LF in a value.
    if "\r" in value or "\n" in value or "\x00" in value:
        raise ValueError("header values must not contain CR, LF or NUL")
    return value.encode("latin-1")


class Body:
    """A request or response body: an async stream of chunks, with the length
    when it is known. ``read()`` buffers it (use only with a size cap)."""

    __slots__ = ("_chunks", "_consumed", "_on_close", "length")

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        length: int | None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._chunks = chunks
        self._consumed = False
        self.length = length
        # Called by aclose(): an async generator that never started runs no
        # finally block when closed, so whatever it holds (an upstream
        # connection) is given back here instead. Must be idempotent.
        self._on_close = on_close

    def __repr__(self) -> str:
        return f"<Body length={self.length} consumed={self._consumed}>"

    @property
    def consumed(self) -> bool:
        return self._consumed

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._consumed:
            raise RuntimeError("body already consumed")
        self._consumed = True
        return self._chunks

    async def aclose(self) -> None:
        """Give up on the rest (releases an upstream connection unreused)."""
        self._consumed = True
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()
        if self._on_close is not None:
            self._on_close()

    async def read(self, limit: int) -> bytes:
        """The whole body; ``ValueError`` if it is longer than ``limit``."""
        if self.length is not None and self.length > limit:
            raise ValueError("body too large")
        parts: list[bytes] = []
        size = 0
        async for chunk in self:
            size += len(chunk)
            if size > limit:
                raise ValueError("body too large")
            parts.append(chunk)
        return b"".join(parts)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    if data:
        yield data


def body_from_bytes(data: bytes) -> Body:
    return Body(_once(data), len(data))


class Request:
    """One request as the gateway received it (and as plugins may change it
    before it goes upstream)."""

    __slots__ = (
        "body",
        "client_ip",
        "headers",
        "http_version",
        "method",
        "path",
        "query",
        "scheme",
    )

    def __init__(
        self,
        *,
        method: str,
        path: str,
        query: str,
        headers: Headers,
        body: Body,
        client_ip: str,
        scheme: str = "http",
        http_version: str = "1.1",
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.client_ip = client_ip
        self.scheme = scheme
        self.http_version = http_version

    def __repr__(self) -> str:
        q = f"?{self.query}" if self.query else ""
        return f"<Request {self.method} {self.path}{q} from {self.client_ip}>"

    @property
    def target(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


class Response:
    """A response: from the upstream (streaming ``body``) or made by the
    gateway or a plugin (``content`` bytes)."""

    __slots__ = ("body", "content", "from_gateway", "headers", "status")

    def __init__(
        self,
        status: int,
        headers: Headers | None = None,
        *,
        content: bytes | None = None,
        body: Body | None = None,
        from_gateway: bool = False,
    ) -> None:
        self.status = status
        self.headers = Headers() if headers is None else headers
        self.content = content
        self.body = body
        # True for what the gateway itself answered (problem+json errors):
        # body-editing plugins leave those whole.
        self.from_gateway = from_gateway

    def __repr__(self) -> str:
        kind = "streaming" if self.body is not None else f"{len(self.content or b'')} bytes"
        return f"<Response {self.status} {kind}>"

    async def read(self, limit: int) -> bytes:
        """The whole body (buffering a streamed one up to ``limit``), and keep it."""
        if self.body is not None:
            self.content = await self.body.read(limit)
            self.body = None
        return self.content or b""
