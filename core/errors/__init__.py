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
        │       InvalidPathParameter, InvalidWebSocketHandshake, WebSocketDisabled
        ├── 401 Unauthorized (family: MissingKey, InvalidKey, KeyRevoked, KeyExpired, KeyRotated,
        │       MissingToken, InvalidToken, TokenExpired)
        ├── 403 InsufficientScope, KeyDisabled, RoleDenied, Forbidden
        ├── 404 RouteNotFound, NotFound        405 MethodNotAllowed
        ├── 408 RequestTimeout                 409 Conflict (IdentityHasKeys, PlanInUse,
        │                                          RoleInUse are Conflicts too)
        ├── 411 LengthRequired (a PayloadTooLarge)
        ├── 413 PayloadTooLarge                417 ExpectationFailed
        ├── 429 RateLimited, QuotaExceeded     431 HeadersTooLarge
        ├── 500 InternalError                  503 TooManyConnections, StoreUnreachable*,
        │                                          LimitsUnavailable
        ├── 502-504 UpstreamError (family: BadGateway, UpstreamTLSError,
        │                                          UpstreamUnavailable, UpstreamTimeout)
        └── 507 StorageFull*   (* also StoreErrors)

Not errors: ``ClientDisconnected`` is a signal (the client went away; nobody
is left to answer), so it is not a ``TriogateError`` and no ``except
TriogateError`` swallows it. Signals internal to one part stay there, never
reach a client and are documented where they are raised:
``dataplane.exchange.StaleConnection`` (a pooled connection died before any
byte of the answer: the pool retries), ``validation._Full`` (stop collecting
errors), ``policy.userregex.RegexError`` (becomes a ``ConfigError``),
``cluster.replica.Gap`` (a replica missed changes: it is rebuilt).

A key the key store refuses is a ``KeyVerdict`` (an enum whose values are
the codes) until a front door refuses the request: ``KEY_ERRORS`` maps each
verdict to its error class, the one place that does.

The tree lives in three modules of this package (``_base``: the roots,
the operator's errors and the signals; ``_keys``: the key refusals and
verdicts; ``_refusals``: the rest), re-exported here: import from
``triogate.errors``, never from them.

The codes are the public contract, listed with when each is answered in
docs/errors.md. ``tests/test_errors.py`` checks the tree against it: every
concrete ``GatewayError`` has its own status, code and title, codes are
unique, and no other module defines an error class.
"""

from __future__ import annotations

from triogate.errors._base import (
    BadRequest,
    ClientDisconnected,
    ConfigError,
    DataDirError,
    FieldError,
    GatewayError,
    InternalError,
    InvalidPathParameter,
    InvalidWebSocketHandshake,
    PluginLoadError,
    Problem,
    SecretsError,
    SecretsMissing,
    StoreDamaged,
    StoreError,
    StoreUnavailable,
    TriogateError,
    ValidationError,
    WebSocketDisabled,
)
from triogate.errors._keys import (
    KEY_ERRORS,
    InsufficientScope,
    InvalidKey,
    InvalidToken,
    KeyDisabled,
    KeyExpired,
    KeyRevoked,
    KeyRotated,
    KeyVerdict,
    MissingKey,
    MissingToken,
    RoleDenied,
    TokenExpired,
    Unauthorized,
)
from triogate.errors._refusals import (
    BadGateway,
    Conflict,
    ExpectationFailed,
    Forbidden,
    HeadersTooLarge,
    IdentityHasKeys,
    InsufficientCredits,
    LengthRequired,
    LimitsUnavailable,
    MethodNotAllowed,
    NoCredits,
    NotFound,
    PayloadTooLarge,
    PlanInUse,
    QuotaExceeded,
    RateLimited,
    RequestTimeout,
    RoleInUse,
    RouteNotFound,
    StorageFull,
    StoreUnreachable,
    TooManyConnections,
    UpstreamError,
    UpstreamTimeout,
    UpstreamTLSError,
    UpstreamUnavailable,
)

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
    "InsufficientCredits",
    "InsufficientScope",
    "InternalError",
    "InvalidKey",
    "InvalidPathParameter",
    "InvalidToken",
    "InvalidWebSocketHandshake",
    "KeyDisabled",
    "KeyExpired",
    "KeyRevoked",
    "KeyRotated",
    "KeyVerdict",
    "LengthRequired",
    "LimitsUnavailable",
    "MethodNotAllowed",
    "MissingKey",
    "MissingToken",
    "NoCredits",
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
    "StoreUnreachable",
    "TokenExpired",
    "TooManyConnections",
    "TriogateError",
    "Unauthorized",
    "UpstreamError",
    "UpstreamTLSError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "ValidationError",
    "WebSocketDisabled",
]
