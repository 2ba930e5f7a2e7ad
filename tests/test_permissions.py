import pytest

from triogate.control.permissions import (
    PERMISSIONS,
    ROLES,
    grants,
    scopes_missing,
    unknown_permissions,
)


@pytest.mark.parametrize(
    ("held", "required", "expected"),
    [
        (["*"], "admin:keys:create", True),
        (["admin:*"], "admin:audit:read", True),
        (["admin:keys:*"], "admin:keys:rotate", True),
        (["admin:keys:*"], "admin:users:create", False),
        (["admin:keys:read"], "admin:keys:read", True),
        (["admin:keys:read"], "admin:keys:readx", False),
        (["admin:key*"], "admin:keys:read", False),  # only ':*' is a wildcard
        ([], "admin:keys:read", False),
    ],
)
def test_grants(held: list[str], required: str, expected: bool) -> None:
    assert grants(held, required) is expected


def test_roles() -> None:
    assert all(grants(ROLES["super_admin"], p) for p in PERMISSIONS)
    assert grants(ROLES["key_admin"], "admin:keys:rotate")
    assert not grants(ROLES["key_admin"], "admin:users:create")
    # Customers (identities, plans, roles) are managed as keys are.
    assert [p for p in PERMISSIONS if grants(ROLES["key_viewer"], p)] == [
        "admin:keys:read",
        "admin:identities:read",
        "admin:plans:read",
        "admin:roles:read",
    ]
    for resource in ("identities", "plans", "roles"):
        for action in ("read", "write"):
            assert grants(ROLES["key_admin"], f"admin:{resource}:{action}")
    assert not grants(ROLES["auditor"], "admin:identities:read")
    assert [p for p in PERMISSIONS if grants(ROLES["auditor"], p)] == ["admin:audit:read"]


def test_unknown_permissions() -> None:
    assert unknown_permissions(["admin:keys:*", "admin:keys:read", "*"]) == []
    assert unknown_permissions(["admin:kyes:read", "admin:nothing:*"]) == [
        "admin:kyes:read",
        "admin:nothing:*",
    ]


@pytest.mark.parametrize(
    ("held", "required", "missing"),
    [
        (["users:read"], ["users:read"], []),
        (["users:*"], ["users:read", "users:write"], []),
        (["users:*"], ["orders:read"], ["orders:read"]),
        (["Users:read"], ["users:read"], ["users:read"]),  # case-sensitive
        (["users"], ["users:read"], ["users:read"]),
        (["users:read"], ["users:read", "users:write"], ["users:write"]),
        ([], [], []),
    ],
)
def test_scopes_missing(held: list[str], required: list[str], missing: list[str]) -> None:
    assert scopes_missing(held, required) == missing
