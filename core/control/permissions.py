"""Admin roles and permissions (pure functions; no I/O).

A permission is ``admin:<resource>:<action>``. An admin holds either a role,
which expands to a fixed set, or an explicit list. A held permission ending in
``:*`` (or ``*`` alone) grants every permission with that prefix.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

__all__ = ["PERMISSIONS", "ROLES", "grants", "scopes_missing"]

PERMISSIONS: Final = (
    "admin:keys:create",
    "admin:keys:read",
    "admin:keys:update",
    "admin:keys:revoke",
    "admin:keys:rotate",
    "admin:identities:read",
    "admin:identities:write",
    "admin:plans:read",
    "admin:plans:write",
    "admin:roles:read",
    "admin:roles:write",
    "admin:users:create",
    "admin:users:read",
    "admin:users:revoke",
    "admin:audit:read",
    "admin:events:read",
    "admin:events:write",
    "admin:system:read",
    "admin:system:maintenance",
)

ROLES: Final[dict[str, tuple[str, ...]]] = {
    "super_admin": ("*",),
    "key_admin": (
        "admin:keys:create",
        "admin:keys:read",
        "admin:keys:update",
        "admin:keys:revoke",
        "admin:keys:rotate",
        # Customers are part of managing keys: identities, plans, roles.
        "admin:identities:read",
        "admin:identities:write",
        "admin:plans:read",
        "admin:plans:write",
        "admin:roles:read",
        "admin:roles:write",
    ),
    "key_viewer": (
        "admin:keys:read",
        "admin:identities:read",
        "admin:plans:read",
        "admin:roles:read",
    ),
    "auditor": ("admin:audit:read",),
}


def _grants_one(held: str, required: str) -> bool:
    if held == required or held == "*":
        return True
    return held.endswith(":*") and required.startswith(held[:-1])


def grants(held: Iterable[str], required: str) -> bool:
    return any(_grants_one(h, required) for h in held)


def effective_permissions(role: str | None, permissions: Iterable[str]) -> tuple[str, ...]:
    return ROLES[role] if role is not None else tuple(permissions)


def unknown_permissions(permissions: Iterable[str]) -> list[str]:
    """Permissions that grant nothing that exists: almost certainly typos."""
    return [p for p in permissions if not any(_grants_one(p, known) for known in PERMISSIONS)]


def scopes_missing(key_scopes: Iterable[str], required: Iterable[str]) -> list[str]:
    """The required scopes the key's scopes do not grant (exact match, or a key
    scope ``prefix:*`` granting every scope that starts with ``prefix:``)."""
    held = tuple(key_scopes)
    exact = frozenset(held)
    wildcards = tuple(s[:-1] for s in held if s.endswith(":*"))
    return [r for r in required if r not in exact and not any(r.startswith(w) for w in wildcards)]
