"""The refusals of API keys (401 and 403) and the key store's verdicts,
mapped to them in one table. Re-exported by ``triogate.errors``."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, ClassVar, Final

from triogate.errors._base import GatewayError


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


class MissingToken(Unauthorized):
    """The jwt plugin's: no bearer token sent."""

    code = "MISSING_TOKEN"
    key_given = False


class InvalidToken(Unauthorized):
    """The jwt plugin's: a token that is not one, forged, not yet valid, for
    another issuer or audience, or signed by a key the gateway does not know."""

    code = "INVALID_TOKEN"


class TokenExpired(Unauthorized):
    code = "TOKEN_EXPIRED"


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
