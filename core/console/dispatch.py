"""The console's only way to the data: the admin API's endpoint table.

A console page names an endpoint by its method and path template
(``"GET", "/keys/{id}"``); ``Dispatcher.call`` runs that row as the admin
API's view does: the session's admin key authenticated by
``AdminService.authenticate``, the row's permission checked with the same
``grants``, the row's precheck, the query and body validated by the row's
types (``convert_all``), then the row's handler. So a page can do nothing
its admin could not do with curl, and is refused with the same error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from triogate.admin.backend import AdminBackend
from triogate.admin.endpoints import ENDPOINTS, Call, Endpoint, Raw
from triogate.control.admins import Principal
from triogate.control.audit import Actor
from triogate.control.permissions import grants
from triogate.errors import Forbidden
from triogate.validation import convert_all

__all__ = ["Dispatcher"]


class Dispatcher:
    def __init__(self, gw: AdminBackend, endpoints: tuple[Endpoint, ...] = ENDPOINTS) -> None:
        self._gw = gw
        self._rows = {(ep.method, ep.path): ep for ep in endpoints}

    def endpoint(self, method: str, path: str) -> Endpoint:
        return self._rows[(method, path)]

    def authenticate(self, admin_key: str) -> Principal:
        """Raises MissingKey, InvalidKey or KeyRevoked, as the API does."""
        return self._gw.admins.authenticate(admin_key)

    def may(self, principal: Principal, method: str, path: str) -> bool:
        """Whether the admin may call this endpoint (what buttons to show)."""
        permission = self.endpoint(method, path).permission
        return permission is None or grants(principal.permissions, permission)

    async def call(
        self,
        principal: Principal,
        method: str,
        path: str,
        *,
        source_ip: str | None,
        params: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> Any:
        """Run the endpoint as ``principal``; its answer as plain data
        (dicts, lists, strings: what the JSON API would send)."""
        ep = self.endpoint(method, path)
        if ep.permission is not None and not grants(principal.permissions, ep.permission):
            raise Forbidden(f"this admin lacks {ep.permission}", required_permission=ep.permission)
        if ep.precheck is not None:
            ep.precheck(self._gw)
        converted_query = None
        if ep.query is not None:
            converted_query = convert_all(dict(query or {}), ep.query, strict=False)
        converted_body = None
        if ep.request is not None:
            converted_body = convert_all(dict(body or {}), ep.request)
        call = Call(
            actor=Actor(principal.id, source_ip),
            params=dict(params or {}),
            body=converted_body,
            query=converted_query,
            permissions=principal.permissions,
        )
        result = await ep.handler(self._gw, call)
        if isinstance(result, Raw):
            return result.body.decode(errors="replace")
        return msgspec.to_builtins(result)
