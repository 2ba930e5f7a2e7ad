"""The admin API's credit operations (``POST /keys/{id}/credits``,
``POST /identities/{id}/credits``) and validate with limit state
(``POST /keys/validate``): rows ``endpoints.ENDPOINTS`` takes in.

``endpoints`` imports this module, so the ``Endpoint`` class comes in as an
argument (and ``Call`` for the type checker only): no import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from msgspec import Struct

from triogate.admin.backend import AdminBackend
from triogate.control.credits import CreditOp, CreditsResult

if TYPE_CHECKING:
    from triogate.admin.endpoints import Call, Endpoint

__all__ = ["credit_endpoints", "validate_key"]


async def validate_key(gw: AdminBackend, call: Call) -> Struct:
    """``POST /keys/validate``: the verdict, and for a valid key its credits
    and limit state (with ``spend``: spent and admitted)."""
    return await gw.credits.validate(call.body)


async def key_credits(gw: AdminBackend, call: Call) -> Struct:
    return await gw.credits.change_key(call.params["id"], call.body, call.actor)


async def identity_credits(gw: AdminBackend, call: Call) -> Struct:
    return await gw.credits.change_identity(call.params["id"], call.body, call.actor)


def credit_endpoints(endpoint: type[Endpoint]) -> tuple[Endpoint, ...]:
    return (
        endpoint(
            "POST",
            "/keys/{id}/credits",
            "Set, increment or decrement a key's credit balance, atomically against spending",
            "admin:keys:update",
            key_credits,
            request=CreditOp,
            response=CreditsResult,
            tags=("keys",),
        ),
        endpoint(
            "POST",
            "/identities/{id}/credits",
            "Set, increment or decrement an identity's pooled credit balance",
            "admin:identities:write",
            identity_credits,
            request=CreditOp,
            response=CreditsResult,
            tags=("identities",),
        ),
    )
