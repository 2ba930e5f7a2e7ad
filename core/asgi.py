"""The ASGI entry point operators name: ``hypercorn triogate.asgi:app``.

The adapter lives in ``triogate.dataplane.asgi``, the standalone app that
opens the gateway in its lifespan in ``triogate.runtime.standalone``; this
module keeps the documented import path stable."""

from triogate.dataplane.asgi import GatewayASGI
from triogate.runtime.standalone import app

__all__ = ["GatewayASGI", "app"]
