"""What the admin API needs from the gateway, declared here (the runtime's
``Gateway`` provides it): the admin layer never imports the runtime."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from triogate.control.admins import AdminService
from triogate.control.audit import Actor, AuditLog
from triogate.control.credits import CreditService
from triogate.control.history import HistoryService
from triogate.control.identities import IdentityService
from triogate.control.keys import KeyService
from triogate.control.plans import PlanService
from triogate.control.roles import RoleService
from triogate.dataplane.pipeline import Pipeline
from triogate.events import EventService
from triogate.telemetry.metrics import Metrics

__all__ = ["AdminBackend", "ConfigControl", "LoadedConfig"]


class LoadedConfig(Protocol):
    """One loaded config (``GET /config`` lists them)."""

    @property
    def version(self) -> str: ...
    @property
    def loaded_at(self) -> float: ...
    @property
    def source(self) -> str | None: ...


class ConfigControl(Protocol):
    """The config history and the reload (``POST /config/reload``)."""

    @property
    def history(self) -> Sequence[LoadedConfig]: ...
    @property
    def reloads(self) -> int: ...
    async def reload(self, actor: Actor) -> LoadedConfig:
        """Raises ConfigError (every problem listed) or Conflict."""
        ...


class AdminBackend(Protocol):
    """The services the admin handlers call."""

    @property
    def keys(self) -> KeyService: ...
    @property
    def admins(self) -> AdminService: ...
    @property
    def roles(self) -> RoleService: ...
    @property
    def identities(self) -> IdentityService: ...
    @property
    def plans(self) -> PlanService: ...
    @property
    def audit(self) -> AuditLog: ...
    @property
    def credits(self) -> CreditService: ...
    @property
    def events(self) -> EventService: ...
    @property
    def history(self) -> HistoryService: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def configs(self) -> ConfigControl: ...
    @property
    def active(self) -> LoadedConfig: ...
    @property
    def pipeline(self) -> Pipeline:
        """The active config's data plane (routes, upstreams)."""
        ...
