"""The tree's roots and the operator's errors (config, storage, secrets), the
refusals every part uses (``GatewayError``, validation, bad requests) and
the signals. Re-exported by ``triogate.errors``: import from there."""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec


class FieldError(msgspec.Struct, frozen=True):
    """One failing field: ``path`` like ``routes[2].upstream``, and why."""

    path: str
    message: str


class Problem(msgspec.Struct, frozen=True, gc=False):
    """What a gateway-made problem+json answer says of itself, carried on the
    response (``Response.problem``) so the access log and the metrics need
    not decode the body back."""

    code: str
    request_id: str


class TriogateError(Exception):
    """The root: something triogate refuses on purpose. ``str(exc)`` is a
    message a person can act on."""


# ---- operator errors: config, storage, secrets -------------------------------


class ConfigError(TriogateError):
    """A config refused, with *every* error found (each with its path)."""

    def __init__(self, errors: list[FieldError], source: str) -> None:
        self.errors = errors
        self.source = source
        lines = "".join(f"\n  {e.path}: {e.message}" for e in errors)
        super().__init__(f"{source}: {len(errors)} error(s){lines}")

    def lines(self) -> list[str]:
        return [f"{e.path}: {e.message}" for e in self.errors]


class PluginLoadError(ConfigError):
    """A plugin could not be loaded or configured; ``errors`` have paths."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__(errors, "plugins")


class StoreError(TriogateError):
    """The store cannot be used as it is. The message is one sentence an
    operator can act on (the CLI prints it as it is, never a traceback)."""


class StoreDamaged(StoreError):
    """The files are not what the store wrote: truncated, overwritten, or
    not an LMDB environment at all."""


class StoreUnavailable(StoreError):
    """The store cannot be opened for writing (permissions, a read-only
    file system, a missing directory)."""


class DataDirError(StoreError):
    """The data directory is not what it was; the message says what and what to do."""


class SecretsError(TriogateError):
    """The server secrets cannot be loaded or do not fit the store."""


class SecretsMissing(SecretsError):
    """No secrets file and no secrets in the environment."""


# ---- request refusals: problem+json ------------------------------------------


class GatewayError(TriogateError):
    """A request refused. A concrete class sets ``status``, ``code`` and
    ``title``; ``headers`` go on the answer (``Allow``, ``Retry-After``,
    ``WWW-Authenticate``) and ``extra`` members into its body."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "INTERNAL_ERROR"
    title: ClassVar[str] = "Internal Server Error"

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        self.detail = detail or self.title
        self.extra = extra
        self.headers: dict[str, str] = {}
        super().__init__(self.detail)

    def problem(self, request_id: str | None = None) -> dict[str, Any]:
        """The RFC 9457 body, with our ``code`` and ``request_id`` members."""
        body: dict[str, Any] = {
            "type": "about:blank",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
            "request_id": request_id,
        }
        body.update(self.extra)
        return body


class InternalError(GatewayError):
    status = 500
    code = "INTERNAL_ERROR"
    title = "Internal Server Error"


class ValidationError(GatewayError):
    status = 400
    code = "VALIDATION_ERROR"
    title = "Bad Request"

    #: An error list is capped: a caller must not be able to make the server
    #: build (and send) one entry per field of a megabyte of JSON.
    MAX_ERRORS: ClassVar[int] = 100

    def __init__(self, errors: list[FieldError], detail: str | None = None) -> None:
        if len(errors) > self.MAX_ERRORS:
            cut = FieldError("$", f"more errors were cut: the first {self.MAX_ERRORS} are listed")
            errors = [*errors[: self.MAX_ERRORS], cut]
        self.errors = errors
        if detail is None:
            detail = "; ".join(f"{e.path}: {e.message}" for e in errors[:5])
        super().__init__(detail, errors=[msgspec.structs.asdict(e) for e in errors])

    @classmethod
    def single(cls, path: str, message: str) -> ValidationError:
        return cls([FieldError(path, message)])


class BadRequest(GatewayError):
    """The request itself is malformed (syntax, framing, target)."""

    status = 400
    code = "BAD_REQUEST"
    title = "Bad Request"


class InvalidPathParameter(GatewayError):
    status = 400
    code = "INVALID_PATH_PARAMETER"
    title = "Bad Request"


class InvalidWebSocketHandshake(GatewayError):
    """A WebSocket upgrade whose opening handshake RFC 6455 refuses (key, version)."""

    status = 400
    code = "INVALID_WEBSOCKET_HANDSHAKE"
    title = "Bad Request"


class WebSocketDisabled(GatewayError):
    """A WebSocket upgrade on a route with ``websocket = false``."""

    status = 400
    code = "WEBSOCKET_DISABLED"
    title = "Bad Request"


# ---- signals -------------------------------------------------------------------


class ClientDisconnected(Exception):
    """The client went away (mid-body, mid-response). Not an error of ours:
    nobody is left to answer, so every layer lets it through quietly."""
