"""The admin API's ``POST /keys/import`` row (``endpoints.ENDPOINTS`` takes
it in): importing keys users already hold (``control.keyimport``).

``endpoints`` imports this module, so the ``Endpoint`` class comes in as an
argument (and ``Call`` for the type checker only): no import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from msgspec import Struct

from triogate.admin.backend import AdminBackend
from triogate.control.keyimport import KeyImporter
from triogate.control.keyimport_models import ImportKeysRequest, ImportResult

if TYPE_CHECKING:
    from triogate.admin.endpoints import Call, Endpoint

__all__ = ["import_endpoints"]


async def import_keys(gw: AdminBackend, call: Call) -> Struct:
    req: ImportKeysRequest = call.body
    return await KeyImporter(gw.keys).run(req.keys, call.actor)


def import_endpoints(endpoint: type[Endpoint]) -> tuple[Endpoint, ...]:
    return (
        endpoint(
            "POST",
            "/keys/import",
            "Import keys users already hold, by plaintext or SHA-256 (1-1000 a call); "
            "each bad item is answered in failed, the others imported",
            "admin:keys:create",
            import_keys,
            request=ImportKeysRequest,
            response=ImportResult,
            tags=("keys",),
        ),
    )
