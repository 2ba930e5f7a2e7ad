"""Explicit wiring: the one place that builds storage, secrets and services
and hands them down. No container, no globals: whoever needs a service gets
it from the object it was given, complete from construction on.

Two objects, one per use:

- ``Services``: storage, secrets and the control-plane services (keys,
  admins, audit, the per-key actors). What the CLI needs; nothing listens.
- ``Gateway``: ``Services`` plus the data plane: the active config, its
  pipeline (built in the constructor: a bad route or plugin raises
  ``ConfigError`` there, every problem listed), telemetry and the config
  manager that reloads it. What ``serve`` and the ASGI app run.

The layers below never import this module: the admin API takes the
gateway as its ``AdminBackend``, the metrics as their ``ScrapeSources``,
the reload as a ``Reloadable``, all Protocols declared where they are used.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from triogate.cluster.events import EventClaims
from triogate.cluster.limits import ClusterLimits, open_cluster_limits
from triogate.cluster.metrics import RecordsCollector
from triogate.cluster.node import ClusterNode, open_records
from triogate.cluster.usage_history import ClusterHistory
from triogate.config import Config, config_version
from triogate.control.admins import AdminService
from triogate.control.audit import AuditLog
from triogate.control.credits import CreditService
from triogate.control.crypto import ServerSecrets
from triogate.control.datadir import lmdb_path
from triogate.control.history import HistoryService, Retention
from triogate.control.identities import IdentityService
from triogate.control.keyformat import Keyspaces
from triogate.control.keys import KeyService
from triogate.control.plans import PlanService
from triogate.control.roles import RoleService
from triogate.control.timeutil import Clock, system_clock
from triogate.dataplane.actors import ActorRegistry, ActorStatistics
from triogate.dataplane.creditops import ActorMeter
from triogate.dataplane.pipeline import Pipeline
from triogate.dataplane.plan import PipelinePlan
from triogate.dataplane.plugin_loader import discover
from triogate.dataplane.plugin_services import plugin_env
from triogate.dataplane.upstream import UpstreamStatistics
from triogate.dataplane.wsstats import STATS as WEBSOCKET_STATS
from triogate.dataplane.wsstats import WebSocketCollector
from triogate.events import EventService
from triogate.plugins.contract import Plugin
from triogate.policy.ratelimit import Limit, limit_from
from triogate.runtime.reload import ActiveConfig, Applies, ConfigManager, Swap
from triogate.storage import Store, StoreStatistics
from triogate.telemetry.accesslog import AccessLog
from triogate.telemetry.metrics import Metrics
from triogate.telemetry.records import Observer
from triogate.telemetry.tracing import Tracers

__all__ = [
    "ActiveConfig",
    "Gateway",
    "Services",
    "lmdb_path",
    "open_gateway",
    "open_services",
]

log = logging.getLogger("triogate.runtime.gateway")


def default_key_limit(config: Config) -> Limit | None:
    """``[keys] default_rate_limit`` as the ``Limit`` keys without limits get."""
    default = config.keys.default_rate_limit
    return None if default is None else limit_from(default, "default")


class Services:
    """Storage, secrets and the control-plane services over them."""

    def __init__(
        self, config: Config, store: Store, secrets: ServerSecrets, *, clock: Clock = system_clock
    ) -> None:
        self.store = store
        self.secrets = secrets
        self.cluster: ClusterNode | None = None  # in a cluster: the node (open_records)
        self.clock = clock
        self.data_dir = config.data_dir
        self.keys = KeyService(store, secrets, prefix=config.keys.prefix, clock=clock)
        self.keys.format = Keyspaces(config.keyspace_prefixes, config.keys.import_formats)
        self.roles = RoleService(store, clock=clock)
        self.identities = IdentityService(store, clock=clock)
        self.plans = PlanService(store, clock=clock)
        self.admins = AdminService(store, secrets, clock=clock)
        self.audit = AuditLog(store)
        self.actors = ActorRegistry(
            store,
            flush_interval=config.storage.flush_interval_seconds,
            idle_timeout=config.storage.actor_idle_seconds,
            clock=clock,
        )
        self.keys.live_balance = self.actors.live_balance  # views show live credits
        self.identities.live_balance = self.actors.live_balance  # the pool's too
        # Usage history: read by the admin API, kept for [storage]'s retention.
        self.history = HistoryService(store, clock=clock)
        self.actors.retention = Retention(
            config.storage.usage_retention_days, config.storage.usage_minute_retention_hours
        )
        # Credit operations and validate's state: applied by the balances'
        # owner, the actors (or the workers' shared table) of this process.
        self.default_key_limit = default_key_limit(config)
        meter = ActorMeter(self.actors, lambda: self.default_key_limit)
        self.credits = CreditService(store, self.keys, meter, clock=clock)
        # Webhooks: key changes write their events in their own transaction.
        self.events = EventService(config.events, store, clock=clock)
        if self.events.enabled:
            self.keys.events = self.events.outbox
        if self.events.live is not None:
            # credits.low from validate's spend and credit operations too
            # (the data plane tells the live events itself).
            self.actors.on_spent = self.events.live.spent

    def __repr__(self) -> str:
        return f"<Services store={self.store!r}>"

    def refresh_secrets(self) -> None:
        """Re-read the server secrets (a reload does this): an HMAC version
        added by another process (``triogate secrets rotate-hmac``) becomes
        known here, so keys created under it validate. Secrets that went
        missing or changed under the running gateway are not taken: the ones
        in use stay, and the next start refuses (``ServerSecrets.refresh``)."""
        self.secrets.refresh()


class Gateway(Services):
    """The services, the active config's data plane, telemetry and reload."""

    def __init__(
        self,
        config: Config,
        store: Store,
        secrets: ServerSecrets,
        *,
        source: str | None = None,
        clock: Clock = system_clock,
        extra_plugins: Sequence[type[Plugin[Any]]] = (),
        limits: ClusterLimits | None = None,
    ) -> None:
        super().__init__(config, store, secrets, clock=clock)
        # A cluster node's limits and credits are decided in Redis: set before
        # the pipeline is built, whose plugins get the cluster's limiter.
        self.actors.cluster = limits
        if limits is not None:  # usage history and webhook events, once per cluster
            wire_cluster_usage(self, limits)
        self.active = ActiveConfig(config, config_version(config), time.time(), source)
        # Plugin classes not installed as entry points (tests, triogate.testing).
        self.extra_plugins = tuple(extra_plugins)
        # Told about every answered request, whichever pipeline (config)
        # served it: metrics, the access log. The access log's writer task
        # is run next to the actors; a reload keeps it ([log] is read once).
        self.observers: list[Observer] = []
        self.access_log = AccessLog.from_config(config.log)
        # The tracing plugin's span exporters (none until a route asks).
        self.tracers = Tracers()
        self.pipeline: Pipeline = self.make_pipeline(self.plan_pipeline(config, None))
        self.metrics = Metrics(self, access_log=self.access_log)
        self.metrics.registry.register(WebSocketCollector(WEBSOCKET_STATS))
        self.observers.append(self.metrics.observe)
        if self.access_log is not None:
            self.observers.append(self.access_log.observe)
        self.configs = ConfigManager(self)
        self.configs.hooks.append(self.use_keyspaces)

    def __repr__(self) -> str:
        return f"<Gateway config={self.active.version} store={self.store!r}>"

    @property
    def config(self) -> Config:
        return self.active.config

    def use_keyspaces(self, swap: Swap) -> None:
        """A reload's keyspaces: keys of an added one validate from now on,
        keys of a removed one are malformed (401) until it is back."""
        self.default_key_limit = default_key_limit(swap.config)  # validate's, as the pipeline's
        if Applies.KEYS in swap.changed:
            self.keys.format = Keyspaces(
                swap.config.keyspace_prefixes, swap.config.keys.import_formats
            )

    def current_pipeline(self) -> Pipeline:
        """The active config's pipeline (a front door reads it per request)."""
        return self.pipeline

    # ---- building a data plane: decide, then act ---------------------------------

    def plan_pipeline(self, config: Config, previous: Pipeline | None) -> PipelinePlan:
        """Decide ``config``'s data plane next to ``previous`` (its unchanged
        upstreams are kept); nothing live changes. Raises ConfigError listing
        every route or plugin problem."""
        default = config.keys.default_rate_limit
        env = plugin_env(
            keys=self.keys,
            actors=self.actors,
            default_key_limit=None if default is None else limit_from(default, "default"),
            clock=self.clock,
            keyspaces=frozenset(config.keyspace_prefixes),
            events=self.events.live,
            tracers=self.tracers,
        )
        registry = {**discover(), **{p.name: p for p in self.extra_plugins}}
        return Pipeline.plan(config, registry, env, previous=previous)

    def make_pipeline(self, plan: PipelinePlan) -> Pipeline:
        """Act on ``plan``: the pipeline, its breakers installed. Cannot fail."""
        pipeline = Pipeline(plan)
        pipeline.observers = self.observers  # shared: survives reloads
        return pipeline

    # ---- what a metrics scrape reads (telemetry's ScrapeSources) ----------------

    def config_version(self) -> str:
        return self.active.version

    def actor_statistics(self) -> ActorStatistics:
        return self.actors.statistics()

    def store_statistics(self) -> StoreStatistics:
        return self.store.statistics()

    def requests_in_flight(self) -> int:
        # The active config's pipeline: a retiring one, after a reload,
        # finishes its own requests uncounted here.
        return self.pipeline.in_flight

    def upstream_statistics(self) -> Iterable[UpstreamStatistics]:
        return [u.statistics() for u in self.pipeline.upstreams.values()]


def wire_cluster_usage(services: Services, limits: ClusterLimits) -> None:
    """A cluster node's usage history goes to (and is read from) Redis, and
    its data-plane events are claimed there (``cluster.usage_history``,
    ``cluster.events``)."""
    history = ClusterHistory(
        limits.link, lambda: services.actors.retention, namespace=limits.namespace
    )
    services.actors.cluster_history = history
    services.history.cluster = history
    if services.events.live is not None:
        services.events.live.gate = EventClaims(limits.link, namespace=limits.namespace)


@asynccontextmanager
async def open_services(config: Config, *, clock: Clock = system_clock) -> AsyncIterator[Services]:
    """The services on ``config.data_dir``, once the data directory proves
    to be what it was (``core/datadir.py``: else ``DataDirError``)."""
    async with open_records(config, heartbeat=False) as (store, secrets, cluster):
        services = Services(config, store, secrets, clock=clock)
        services.cluster = cluster
        yield services


@asynccontextmanager
async def open_gateway(
    config: Config,
    *,
    source: str | None = None,
    clock: Clock = system_clock,
    extra_plugins: Sequence[type[Plugin[Any]]] = (),
) -> AsyncIterator[Gateway]:
    """The whole gateway on ``config.data_dir`` (see ``open_services``), its
    pipeline built (``ConfigError`` for a bad route or plugin)."""
    async with open_records(config) as (store, secrets, cluster), _open_limits(config) as limits:
        gw = Gateway(
            config,
            store,
            secrets,
            source=source,
            clock=clock,
            extra_plugins=extra_plugins,
            limits=limits,
        )
        gw.cluster = cluster
        if cluster is not None:
            gw.metrics.registry.register(RecordsCollector(cluster.status, cluster.store))
        try:
            yield gw
        finally:
            gw.pipeline.close()
            await gw.tracers.aclose()  # the last spans out, bounded


@asynccontextmanager
async def _open_limits(config: Config) -> AsyncIterator[ClusterLimits | None]:
    """A cluster node's ``ClusterLimits`` (its own Redis link, health-checked,
    and its batcher); None without ``[cluster] redis_url``."""
    if config.cluster.redis_url is None:
        yield None
        return
    async with open_cluster_limits(config.cluster) as limits:
        yield limits
