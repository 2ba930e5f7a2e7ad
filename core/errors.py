"""Every error triogate raises on purpose, in one tree.

Theory of operation
-------------------
Code below the boundaries raises these classes and nothing else; each
boundary translates them once:

* the front doors (the proxy connection loop, the ASGI adapter, the admin
  app) turn a ``GatewayError`` into an RFC 9457 problem+json answer with the
  class's ``status`` and ``code``; on the data plane the pipeline does it for
  both front doors, so that response plugins and the access log see the
  refusal like any answer;
* the CLI and the server's start-up turn a ``ConfigError``, ``StoreError`` or
  ``SecretsError`` into a message and an exit status, a reload into a refusal.

Anything else that escapes is a bug and becomes 500 ``INTERNAL_ERROR``
(logged with the request id, never a stack trace in the answer).

The tree::

    TriogateError                  something triogate refuses, with a message for a person
    ├── ConfigError                a config (file, environment, reload) refused, every error
    │   └── PluginLoadError        a plugin that cannot be loaded or configured
    ├── StoreError                 the data directory or store cannot be used as it is
    │   ├── StoreDamaged           not what the store wrote
    │   ├── StoreUnavailable       cannot be opened (permissions, read-only, missing)
    │   ├── DataDirError           the data directory is not what it was
    │   └── StorageFull*           (also a GatewayError: 507)
    ├── SecretsError               the server secrets cannot be loaded
    │   └── SecretsMissing
    └── GatewayError               a request refused: status + code -> problem+json
        ├── 400 ValidationError (VALIDATION_ERROR, with ``errors``), BadRequest,
        │       InvalidPathParameter
        ├── 401 Unauthorized (family: MissingKey, InvalidKey, KeyRevoked, KeyExpired, KeyRotated)
        ├── 403 InsufficientScope, KeyDisabled, RoleDenied, Forbidden
        ├── 404 RouteNotFound, NotFound        405 MethodNotAllowed
        ├── 408 RequestTimeout                 409 Conflict (IdentityHasKeys, PlanInUse,
        │                                          RoleInUse are Conflicts too)
        ├── 411 LengthRequired (a PayloadTooLarge)
        ├── 413 PayloadTooLarge                417 ExpectationFailed
        ├── 429 RateLimited, QuotaExceeded     431 HeadersTooLarge
        ├── 500 InternalError                  503 TooManyConnections
        ├── 502-504 UpstreamError (family: BadGateway, UpstreamUnavailable, UpstreamTimeout)
        └── 507 StorageFull*

Not errors: ``ClientDisconnected`` is a signal (the client went away; nobody
is left to answer), so it is not a ``TriogateError`` and no ``except
TriogateError`` swallows it. Signals internal to one part stay there, never
reach a client and are documented where they are raised:
``dataplane.exchange.StaleConnection`` (a pooled connection died before any
byte of the answer: the pool retries), ``validation._Full`` (stop collecting
errors), ``policy.userregex.RegexError`` (becomes a ``ConfigError``).

A key the key store refuses is a ``KeyVerdict`` (an enum whose values are
the codes) until a front door refuses the request: ``KEY_ERRORS`` maps each
verdict to its error class, the one place that does.

The codes are the public contract, listed with when each is answered in
docs/errors.md. ``tests/test_errors.py`` checks the tree against it: every
concrete ``GatewayError`` has its own status, code and title, codes are
unique, and no other module defines an error class.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, ClassVar, Final

import msgspec

__all__ = [
    "KEY_ERRORS",
    "BadGateway",
    "BadRequest",
    "ClientDisconnected",
    "ConfigError",
    "Conflict",
    "DataDirError",
    "ExpectationFailed",
    "FieldError",
    "Forbidden",
    "GatewayError",
    "HeadersTooLarge",
    "IdentityHasKeys",
    "InsufficientScope",
    "InternalError",
    "InvalidKey",
    "InvalidPathParameter",
    "KeyDisabled",
    "KeyExpired",
    "KeyRevoked",
    "KeyRotated",
    "KeyVerdict",
    "LengthRequired",
    "MethodNotAllowed",
    "MissingKey",
    "NotFound",
    "PayloadTooLarge",
    "PlanInUse",
    "PluginLoadError",
    "Problem",
    "QuotaExceeded",
    "RateLimited",
    "RequestTimeout",
    "RoleDenied",
    "RoleInUse",
    "RouteNotFound",
    "SecretsError",
    "SecretsMissing",
    "StorageFull",
    "StoreDamaged",
    "StoreError",
    "StoreUnavailable",
    "TooManyConnections",
    "TriogateError",
    "Unauthorized",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "ValidationError",
]


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


class Unauthorized(GatewayError):
    """The 401 family (never raised itself). RFC 9110 (11.6.1) requires a
    challenge with every 401; RFC 6750 (3.1) adds ``error="invalid_token"``
    when a key was sent and refused. The admin API answers for its own realm
    (``challenge("triogate-admin")``)."""

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


class KeyDisabled(GatewayError):
    """The key, or its identity, is disabled (``enabled: false``): reversible,
    unlike revocation, so a 403 and not a 401 (the key is known and valid)."""

    status = 403
    code = "KEY_DISABLED"
    title = "Forbidden"


class RoleDenied(GatewayError):
    """The key has a role the route's key-auth lists in ``deny_roles``."""

    status = 403
    code = "ROLE_DENIED"
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


class RequestTimeout(GatewayError):
    """The request's head or body did not arrive in time (slowloris)."""

    status = 408
    code = "REQUEST_TIMEOUT"
    title = "Request Timeout"


class Conflict(GatewayError):
    status = 409
    code = "CONFLICT"
    title = "Conflict"


class IdentityHasKeys(Conflict):
    """Deleting an identity that still has live keys (without ``revoke_keys``)."""

    code = "IDENTITY_HAS_KEYS"


class PlanInUse(Conflict):
    """Deleting a plan some key or identity is still on."""

    code = "PLAN_IN_USE"


class RoleInUse(Conflict):
    """Deleting (or renaming) a role some key still names."""

    code = "ROLE_IN_USE"


class PayloadTooLarge(GatewayError):
    status = 413
    code = "PAYLOAD_TOO_LARGE"
    title = "Content Too Large"


class LengthRequired(PayloadTooLarge):
    """A body-size limit that needs the length up front (the
    request-size-limiting plugin's ``require_content_length``); a
    ``PayloadTooLarge`` so that whoever refuses over-long bodies refuses
    this too."""

    status = 411
    code = "LENGTH_REQUIRED"
    title = "Length Required"


class ExpectationFailed(GatewayError):
    status = 417
    code = "EXPECTATION_FAILED"
    title = "Expectation Failed"


class RateLimited(GatewayError):
    status = 429
    code = "RATE_LIMITED"
    title = "Too Many Requests"


class QuotaExceeded(GatewayError):
    status = 429
    code = "QUOTA_EXCEEDED"
    title = "Too Many Requests"


class HeadersTooLarge(GatewayError):
    status = 431
    code = "HEADERS_TOO_LARGE"
    title = "Request Header Fields Too Large"


class TooManyConnections(GatewayError):
    """The proxy listener is at its connection cap."""

    status = 503
    code = "TOO_MANY_CONNECTIONS"
    title = "Service Unavailable"


class UpstreamError(GatewayError):
    """The upstream family (never raised itself). Its ``detail`` names hosts
    and ports: it goes to the log (with the request id), and clients get
    ``public_detail``."""

    public_detail: ClassVar[str] = "the upstream failed"


class BadGateway(UpstreamError):
    status = 502
    code = "BAD_GATEWAY"
    title = "Bad Gateway"
    public_detail = "the upstream could not be reached or broke the protocol"


class UpstreamUnavailable(UpstreamError):
    status = 503
    code = "UPSTREAM_UNAVAILABLE"
    title = "Service Unavailable"
    public_detail = "no healthy upstream target right now; see Retry-After"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "UPSTREAM_TIMEOUT"
    title = "Gateway Timeout"
    public_detail = "the upstream did not answer in time"


class StorageFull(GatewayError, StoreError):
    """A write did not fit in ``storage.map_size_mb``; nothing of it was
    written, reads and other writes go on. Raised by the store itself, so
    every boundary translates it like any other refusal (507 on the admin
    API, ``STORAGE_FULL: ...`` from the CLI)."""

    status = 507
    code = "STORAGE_FULL"
    title = "Insufficient Storage"


# ---- signals -------------------------------------------------------------------


class ClientDisconnected(Exception):
    """The client went away (mid-body, mid-response). Not an error of ours:
    nobody is left to answer, so every layer lets it through quietly."""


# ---- key verdicts ----------------------------------------------------------------


class KeyVerdict(StrEnum):
    """Why the key store refuses an API key (``control.keyrules.key_decision``,
    ``KeyService.validate_nowait``). The value is the public code: the admin
    API's ``POST /keys/validate`` answers it as ``code``, and the data plane
    refuses with the error ``KEY_ERRORS`` names, whose ``code`` it is."""

    INVALID_KEY = "INVALID_KEY"
    KEY_REVOKED = "KEY_REVOKED"
    KEY_EXPIRED = "KEY_EXPIRED"
    KEY_ROTATED = "KEY_ROTATED"
    INSUFFICIENT_SCOPE = "INSUFFICIENT_SCOPE"
    KEY_DISABLED = "KEY_DISABLED"
    ROLE_DENIED = "ROLE_DENIED"


#: The one table from a key verdict to the error that refuses the request,
#: with what the client is told (``INSUFFICIENT_SCOPE``'s refusal names the
#: missing scopes in its own detail).
KEY_ERRORS: Final[Mapping[KeyVerdict, tuple[type[GatewayError], str]]] = {
    KeyVerdict.INVALID_KEY: (InvalidKey, "the API key is malformed or unknown"),
    KeyVerdict.KEY_REVOKED: (KeyRevoked, "the API key has been revoked"),
    KeyVerdict.KEY_EXPIRED: (KeyExpired, "the API key has expired"),
    KeyVerdict.KEY_ROTATED: (KeyRotated, "the API key was rotated and its grace period is over"),
    # Without the record the missing scopes are unknown: the class's title,
    # as before the verdicts were typed.
    KeyVerdict.INSUFFICIENT_SCOPE: (InsufficientScope, InsufficientScope.title),
    KeyVerdict.KEY_DISABLED: (KeyDisabled, "the API key is disabled"),
    KeyVerdict.ROLE_DENIED: (RoleDenied, "a role of the API key is denied on this route"),
}
