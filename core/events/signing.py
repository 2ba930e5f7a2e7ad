"""Webhook signatures, Stripe's scheme: pure functions, no I/O.

Every delivery carries ``Triogate-Signature: t=<unix seconds>,v1=<hex>``
where the hex is HMAC-SHA256(secret, ``"<t>.<body>"``) over the exact bytes
of the body. Signing the timestamp with the body lets a receiver refuse a
replayed delivery: it recomputes the HMAC, compares in constant time and
accepts only a ``t`` within its tolerance (``DEFAULT_TOLERANCE_SECONDS``) of
its own clock. A receiver may see several ``v1=`` entries (a future secret
rotation signs with both): any one that matches is enough.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

__all__ = [
    "DEFAULT_TOLERANCE_SECONDS",
    "SIGNATURE_HEADER",
    "signature_header",
    "verify_signature",
]

SIGNATURE_HEADER: Final = "Triogate-Signature"
#: What receivers should accept between ``t`` and their clock (Stripe's default).
DEFAULT_TOLERANCE_SECONDS: Final = 300


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Triogate-Signature`` value for ``body`` sent at ``timestamp``."""
    return f"t={timestamp},v1={_digest(secret, timestamp, body)}"


def verify_signature(
    secret: str,
    header: str,
    body: bytes,
    now: float,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` and its timestamp is
    within ``tolerance`` seconds of ``now`` (what a receiver checks)."""
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates or abs(now - timestamp) > tolerance:
        return False
    expected = _digest(secret, timestamp, body)
    return any(hmac.compare_digest(expected, c) for c in candidates)
