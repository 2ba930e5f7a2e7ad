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

from triogate.errors import BadRequest, Problem

__all__ = [
    "FORWARDED_PREFIX",
    "GATEWAY_SET",
    "HOP_BY_HOP",
    "Body",
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


# Paths are checked as ``str``: ``b"%" in path`` costs ~8x ``"%" in path``
# on CPython (the bytes test first tries the needle as an int), and the
# ASCII decode is needed for the result anyway.
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_SLASHES = re.compile(r"//+")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")

# Headers the gateway itself sets on (or strips from) the upstream request:
# the upstream head builder (h1client.py) drops a client's own. With
# ``underscores_in_headers`` on, a client header that a CGI or WSGI
# upstream would read as one of these (``X_Key_ID`` is ``HTTP_X_KEY_ID``,
# like ``X-Key-ID``) is still dropped: it would shadow the gateway's own.
# tests/test_header_names.py checks every header the builder writes is here.
GATEWAY_SET: Final = HOP_BY_HOP | frozenset(
    {
        b"host",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-request-id",
        b"x-key-id",
        b"x-key-roles",
        b"forwarded",
        b"content-length",
        b"expect",
        # Not set by the gateway, but what only a proxy in front of the
        # upstream may say, and upstreams act on it: the client's address
        # (nginx realip, many frameworks' "client IP") and the URL before a
        # rewrite (IIS, Symfony and Zend route on X-Original-URL and
        # X-Rewrite-URL, which would let a client pick the path after the
        # gateway authorised another). Never forwarded from a client.
        b"x-real-ip",
        b"x-original-url",
        b"x-rewrite-url",
        b"",  # no header at all (only a plugin could make one): never written
    }
)
# Every other ``x-forwarded-*`` (``-port``, ``-prefix``, ``-server``,
# ``-ssl``, ``-scheme``, …) is dropped too: frameworks build redirects and
# links, and decide "is this HTTPS", from them. A prefix test, so none is
# missed; the builder runs it only for names that start with ``x``.
FORWARDED_PREFIX: Final = b"x-forwarded-"


def _normalize_escape(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    if char in _UNRESERVED:
        return char  # %61 is 'a' for every upstream: route it as 'a'
    if char in "/\\\x00":  # '/', '\', NUL: ambiguous or dangerous
        raise BadRequest("encoded '/', '\\' or NUL in the path is not allowed")
    # Kept encoded (so '%25' stays '%25': decoding it would make a new '%'
    # that a second pass, or the upstream, would decode again).
    return "%" + match.group(1).upper()


def _drops(name: bytes, underscores: bool) -> bool:
    # Only called for names with '_' (0x5F) in them.
    if not underscores:
        return True
    name = name.replace(b"_", b"-")
    return name in GATEWAY_SET or name.startswith(FORWARDED_PREFIX)


def strip_connection_headers(headers: Headers, underscores: bool = False) -> None:
    """Remove ``Connection`` and every header it names, as a proxy must
    (RFC 9110 §7.6.1), and every header whose name contains ``_`` (as nginx
    does), unless ``underscores`` (``server.underscores_in_headers``) is on;
    even then one that would read as a header the gateway sets or never
    forwards (``GATEWAY_SET`` or ``x-forwarded-*``, with ``_`` for ``-``) is
    removed. Done by the front
    doors *before* any plugin runs, so a client cannot name (and so remove)
    a header a plugin adds upstream, nor smuggle ``X_Key_ID`` past one."""
    # One scan and no new list in the common case: nothing to drop. The int
    # needle: ``b"_" in name`` is ~8x slower on CPython (see _ESCAPE).
    for name, _ in headers.raw:
        if name == b"connection" or (0x5F in name and _drops(name, underscores)):
            break
    else:
        return
    named = {b"connection"}
    for name, value in headers.raw:
        if name == b"connection":
            named.update(t for t in (t.strip().lower() for t in value.split(b",")) if t)
    headers.raw = [
        (k, v)
        for k, v in headers.raw
        if k not in named and not (0x5F in k and _drops(k, underscores))
    ]


def _dot_segment(segment: str) -> bool:
    # A ';params' suffix (literal, or encoded as %3B for upstreams that
    # decode before splitting it off) does not stop '..' from being '..'.
    return segment.split(";", 1)[0].split("%3B", 1)[0] in ("..", ".")


def check_target(url: bytes, path_parameters: bool = False) -> tuple[str, str]:
    """Split an origin-form request target into (path, query) and normalise
    the path the way an upstream will read it, so that what is routed (and
    authorised) is what is forwarded: percent-encoded unreserved characters
    are decoded (RFC 3986 §6.2.2.2), other escapes upper-cased, and runs of
    ``/`` merged into one (as nginx's ``merge_slashes``). Refused (400
    ``BAD_REQUEST``): absolute- and authority-form targets, a fragment
    (``#``), a ``%`` in the path not followed by two hex digits (RFC 3986
    §2.1), ``.``/``..`` segments (also encoded, also with ``;params``),
    encoded ``/``, backslashes, NUL, non-ASCII. Both front doors call this
    before routing.

    Path parameters (``/private;x/data``, also ``%3B``): Tomcat, Jetty and
    other servlet containers serve that as ``/private/data``, while a router
    that matches segments as text sees ``private;x``, not ``private``, and
    may send it through a less protected route. Refused unless
    ``path_parameters`` (``server.allow_path_parameters``); then kept (the
    upstream gets them), and the router matches each segment without its
    ``;…`` (``router.routing_segments``), except that a segment that is
    nothing but parameters (``/;x``, ``/a/%3Bx``) is still refused: an
    upstream reads it as an empty segment, which it may merge away.

    The result is a fixed point: ``check_target`` of the normalised target
    gives it back unchanged. That holds because every ``%`` left in the path
    starts a valid escape of a byte that is not decoded, so no second pass
    (ours or the upstream's one decode) can make a new escape, ``/`` or dot
    segment out of it (``%%32%65`` is refused, not turned into ``%2e``). The
    query is passed on as it came."""
    try:
        target = url.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("the request target must be ASCII (percent-encode the rest)") from None
    if not target.startswith("/"):
        raise BadRequest("only origin-form request targets (/path?query) are accepted")
    if "#" in target:
        raise BadRequest("a fragment ('#') is not part of a request target")
    path, _, query = target.partition("?")
    # Each step runs only when its trigger is present: the common path (no
    # '%', no '//', no '/.', no ';') costs a few substring tests and no regex.
    parameters = ";" in path
    if "%" in path:
        escapes = path.count("%")
        path, decoded = _ESCAPE.subn(_normalize_escape, path)
        if decoded != escapes:
            raise BadRequest("'%' in the path must start an escape of two hex digits (RFC 3986)")
        parameters = parameters or "%3B" in path  # upper-cased just now
    if "//" in path:
        path = _SLASHES.sub("/", path)
    if "\\" in path or "\x00" in path:
        raise BadRequest("invalid characters in the path")
    if parameters:
        if not path_parameters:
            raise BadRequest(
                "path parameters (';' or '%3B' in the path) are not accepted"
                " (server.allow_path_parameters)"
            )
        if "/;" in path or "/%3B" in path:
            raise BadRequest("a path segment must not start with ';' (nothing but parameters)")
    if "/." in path and any(_dot_segment(s) for s in path.split("/")):
        raise BadRequest("'.' and '..' path segments are not allowed")
    return path, query


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


class _Once:
    """The chunks of a body held whole: the bytes, once (none when empty).
    A class, not an async generator: this module is compiled with mypyc,
    which does not compile async generators."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __aiter__(self) -> _Once:
        return self

    async def __anext__(self) -> bytes:
        data = self._data
        if not data:
            raise StopAsyncIteration
        self._data = b""
        return data


def body_from_bytes(data: bytes) -> Body:
    return Body(_Once(data), len(data))


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
    #: The subject of the client's verified TLS certificate (mTLS), RFC 4514
    #: (``CN=alice,O=Example``); None without one. A class default: only the
    #: TLS listener's requests (a subclass with its slot) carry a value, so
    #: plain requests pay nothing for it.
    client_cert: str | None = None

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

    __slots__ = ("body", "content", "from_gateway", "headers", "problem", "status")

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
        # Set on the gateway's problem+json answers (code, request id), so
        # telemetry never decodes the body back.
        self.problem: Problem | None = None

    def __repr__(self) -> str:
        kind = "streaming" if self.body is not None else f"{len(self.content or b'')} bytes"
        return f"<Response {self.status} {kind}>"

    async def read(self, limit: int) -> bytes:
        """The whole body (buffering a streamed one up to ``limit``), and keep it."""
        if self.body is not None:
            self.content = await self.body.read(limit)
            self.body = None
        return self.content or b""
