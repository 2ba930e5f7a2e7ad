"""One error hierarchy for everything the gateway itself refuses.

Each error carries its machine-readable ``code`` and HTTP ``status`` (CONTRACT
§4). Code below the boundaries raises these; the boundaries (admin app, proxy
listener, CLI) translate them once into problem+json, an exit status, or a
message. Anything else that escapes is a bug and becomes 500 INTERNAL_ERROR.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec

from triogate.storage.base import StoreFull

__all__ = [
    "BadRequest",
    "Conflict",
    "FieldError",
    "Forbidden",
    "GatewayError",
    "HeadersTooLarge",
    "InsufficientScope",
    "InternalError",
    "InvalidKey",
    "KeyExpired",
    "KeyRevoked",
    "KeyRotated",
    "MethodNotAllowed",
    "MissingKey",
    "NotFound",
    "PayloadTooLarge",
    "RouteNotFound",
    "Unauthorized",
    "ValidationError",
]


class FieldError(msgspec.Struct, frozen=True):
    path: str
    message: str


class GatewayError(Exception):
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
    pass


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


class Unauthorized(GatewayError):
    """A 401. RFC 9110 (11.6.1) requires a challenge with every 401; RFC 6750
    (3.1) adds ``error="invalid_token"`` when a key was sent and refused. The
    admin API answers for its own realm (``challenge("triogate-admin")``)."""

    status = 401
    title = "Unauthorized"
    key_given: ClassVar[bool] = True

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.challenge("triogate")

    def challenge(self, realm: str) -> None:
        value = f'Bearer realm="{realm}"'
        self.headers["WWW-Authenticate"] = (
            f'{value}, error="invalid_token"' if self.key_given else value
        )


class MissingKey(Unauthorized):
    code = "MISSING_KEY"
    key_given = False


class InvalidKey(Unauthorized):
    code = "INVALID_KEY"


class KeyRevoked(Unauthorized):
    code = "KEY_REVOKED"


class KeyExpired(Unauthorized):
    code = "KEY_EXPIRED"


class KeyRotated(Unauthorized):
    code = "KEY_ROTATED"


class InsufficientScope(GatewayError):
    status = 403
    code = "INSUFFICIENT_SCOPE"
    title = "Forbidden"


class Forbidden(GatewayError):
    status = 403
    code = "FORBIDDEN"
    title = "Forbidden"


class RouteNotFound(GatewayError):
    status = 404
    code = "ROUTE_NOT_FOUND"
    title = "Not Found"


class NotFound(GatewayError):
    status = 404
    code = "NOT_FOUND"
    title = "Not Found"


class MethodNotAllowed(GatewayError):
    status = 405
    code = "METHOD_NOT_ALLOWED"
    title = "Method Not Allowed"

    def __init__(self, allowed: list[str], detail: str | None = None) -> None:
        super().__init__(detail)
        self.headers["Allow"] = ", ".join(allowed)


class Conflict(GatewayError):
    status = 409
    code = "CONFLICT"
    title = "Conflict"


class PayloadTooLarge(GatewayError):
    status = 413
    code = "PAYLOAD_TOO_LARGE"
    title = "Content Too Large"


class HeadersTooLarge(GatewayError):
    status = 431
    code = "HEADERS_TOO_LARGE"
    title = "Request Header Fields Too Large"


class StorageFull(GatewayError, StoreFull):
    """A write did not fit in ``storage.map_size_mb``. Raised by the store
    itself (the gateway opens it with this class), so every boundary
    translates it like any other refusal."""

    status = 507
    code = "STORAGE_FULL"
    title = "Insufficient Storage"


# Key-validation outcome codes -> the error that refuses the request.
KEY_ERRORS: dict[str, type[GatewayError]] = {
    cls.code: cls
    for cls in (InvalidKey, KeyRevoked, KeyExpired, KeyRotated, InsufficientScope, MissingKey)
}
