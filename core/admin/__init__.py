"""The admin API (quart-trio on hypercorn): keys, admins, audit, config,
routes, upstreams and metrics, over the services an ``AdminBackend`` lends."""

from triogate.admin.app import DrainUnreadBody, create_admin_app
from triogate.admin.backend import AdminBackend, ConfigControl, LoadedConfig

__all__ = ["AdminBackend", "ConfigControl", "DrainUnreadBody", "LoadedConfig", "create_admin_app"]
