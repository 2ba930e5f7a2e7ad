"""docs/admin-api.md keeps up with the admin endpoint table and the permissions.

Fails when an endpoint of ``triogate.admin.endpoints.ENDPOINTS`` (method and
path, as in ``GET /keys/{id}``) is not mentioned on the page, when the
"Endpoints at a glance" table lacks it or names another permission than the
endpoint's, when that table lists an endpoint that does not exist, or when a
role of ``triogate.control.permissions.ROLES`` or a permission of ``PERMISSIONS`` has
no row (a role's row must list exactly its permissions).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from triogate.admin.endpoints import ENDPOINTS, Endpoint
from triogate.control.permissions import PERMISSIONS, ROLES

DOCS = Path(__file__).resolve().parent.parent / "docs" / "admin-api.md"
GLANCE_HEADING = "## Endpoints at a glance"
ROLES_HEADING = "## Roles and permissions"
# Served by the admin app outside the endpoint table.
EXTRA_ENDPOINTS = {"GET /openapi.json"}

_HEADING_RE = re.compile(r"^#{1,6}\s")
_CODE_SPAN_RE = re.compile(r"`([^`\n]+)`")
_ROW_RE = re.compile(r"^\|\s*`([^`]+)`\s*\|(.*)$")


def _docs() -> str:
    assert DOCS.is_file(), f"{DOCS} is missing"
    return DOCS.read_text(encoding="utf-8")


def _section(heading: str) -> str:
    lines = _docs().splitlines()
    assert heading in lines, f"docs/admin-api.md has no heading {heading!r}"
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if _HEADING_RE.match(lines[i])), len(lines))
    return "\n".join(lines[start:end])


def _rows(heading: str) -> dict[str, list[str]]:
    """First-cell code span -> the other cells, for every table row under ``heading``."""
    rows: dict[str, list[str]] = {}
    for line in _section(heading).splitlines():
        m = _ROW_RE.match(line.strip())
        if m:
            assert m.group(1) not in rows, f"{heading}: `{m.group(1)}` has two rows"
            rows[m.group(1)] = [c.strip() for c in m.group(2).strip().strip("|").split("|")]
    return rows


def _label(ep: Endpoint) -> str:
    return f"{ep.method} {ep.path}"


def test_there_are_endpoints() -> None:
    assert len(ENDPOINTS) >= 15, [_label(ep) for ep in ENDPOINTS]


@pytest.mark.parametrize("ep", ENDPOINTS, ids=_label)
def test_endpoint_is_mentioned(ep: Endpoint) -> None:
    assert _label(ep) in _docs(), f"docs/admin-api.md never mentions `{_label(ep)}`"


@pytest.mark.parametrize("ep", ENDPOINTS, ids=_label)
def test_endpoint_is_in_the_table_with_its_permission(ep: Endpoint) -> None:
    rows = _rows(GLANCE_HEADING)
    assert _label(ep) in rows, f"{GLANCE_HEADING}: no row for `{_label(ep)}`"
    cell = rows[_label(ep)][0]
    if ep.permission is None:
        assert cell.startswith("none"), f"`{_label(ep)}` needs no permission, the page says {cell}"
    else:
        assert cell == f"`{ep.permission}`", (
            f"`{_label(ep)}` needs `{ep.permission}`, the page says {cell}"
        )


def test_the_table_lists_no_endpoint_that_does_not_exist() -> None:
    real = {_label(ep) for ep in ENDPOINTS} | EXTRA_ENDPOINTS
    stale = sorted(set(_rows(GLANCE_HEADING)) - real)
    assert not stale, f"{GLANCE_HEADING}: rows for endpoints that do not exist: {stale}"


def test_openapi_is_pointed_at() -> None:
    text = _docs()
    assert "GET /openapi.json" in text and "OpenAPI 3.1" in text


@pytest.mark.parametrize("role", sorted(ROLES))
def test_role_has_a_row_with_its_permissions(role: str) -> None:
    rows = _rows(ROLES_HEADING)
    assert role in rows, f"{ROLES_HEADING}: no row for the role `{role}`"
    documented = set(_CODE_SPAN_RE.findall(rows[role][0]))
    assert documented == set(ROLES[role]), (
        f"role `{role}`: the page lists {sorted(documented)}, the code {sorted(ROLES[role])}"
    )


@pytest.mark.parametrize("permission", PERMISSIONS)
def test_permission_has_a_row(permission: str) -> None:
    rows = _rows(ROLES_HEADING)
    assert permission in rows, f"{ROLES_HEADING}: no row for the permission `{permission}`"
    assert rows[permission][0], f"`{permission}`: the row says nothing"


def test_permission_rows_name_the_endpoints_that_need_them() -> None:
    rows = _rows(ROLES_HEADING)
    wrong = [
        f"{_label(ep)} under {ep.permission}"
        for ep in ENDPOINTS
        if ep.permission is not None
        and ep.permission in rows
        and f"`{_label(ep)}`" not in rows[ep.permission][0]
    ]
    assert not wrong, f"{ROLES_HEADING}: the permission table does not list {wrong}"
