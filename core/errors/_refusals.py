"""Every other refusal: routing, conflicts, limits, sizes, timeouts, the
upstream and the store. Re-exported by ``triogate.errors``."""

from __future__ import annotations

from typing import ClassVar

from triogate.errors._base import GatewayError, StoreError


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


class InsufficientCredits(Conflict):
    """A credit ``decrement`` larger than the balance: nothing is taken."""

    code = "INSUFFICIENT_CREDITS"


class NoCredits(Conflict):
    """A credit operation on a key (or identity) that has no credits."""

    code = "NO_CREDITS"


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


class LimitsUnavailable(GatewayError):
    """A cluster node cannot reach the cluster's Redis to decide a key's
    limits or credits, and ``[cluster] fallback = "deny"``: the request is
    refused rather than decided without the other nodes (``triogate.cluster``)."""

    status = 503
    code = "LIMITS_UNAVAILABLE"
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


class UpstreamTLSError(BadGateway):
    """An https upstream failed its TLS handshake: a certificate that does
    not verify (expired, self-signed, another host's name) or no common
    protocol. A BadGateway, so breakers and retries treat it as one."""

    code = "UPSTREAM_TLS_ERROR"
    public_detail = "the upstream's TLS certificate or handshake failed verification"


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


class StoreUnreachable(GatewayError, StoreError):
    """A cluster node cannot reach the cluster's Redis (or the cluster is
    being re-seeded): an admin write is refused, nothing of it was written;
    reads and the data plane go on from the node's replica (``triogate.cluster``)."""

    status = 503
    code = "STORE_UNAVAILABLE"
    title = "Service Unavailable"
