"""The ASGI entry point operators name: ``hypercorn triogate.asgi:app``.

The adapter itself lives in ``triogate.dataplane.asgi``; this module keeps the
documented import path stable."""

from triogate.dataplane.asgi import GatewayASGI, app

__all__ = ["GatewayASGI", "app"]
