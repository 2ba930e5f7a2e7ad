"""Explicit wiring: the one place that builds storage, secrets and services
and hands them down. No container, no globals: whoever needs a service gets
it from the ``Gateway`` it was given."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec

from triogate.config import Config, config_version
from triogate.control.admins import AdminService
from triogate.control.audit import AuditLog
from triogate.control.crypto import SecretsError, ServerSecrets, load_secrets
from triogate.control.datadir import compare_fingerprints, lmdb_path, open_data_dir
from triogate.control.keys import KeyService
from triogate.control.timeutil import Clock, system_clock
from triogate.dataplane.actors import ActorRegistry
from triogate.dataplane.pipeline import Pipeline
from triogate.dataplane.plugin_loader import discover
from triogate.errors import StorageFull
from triogate.plugins.contract import Plugin, PluginEnv
from triogate.runtime.reload import ConfigManager
from triogate.storage import RateLimit, Store
from triogate.telemetry.accesslog import AccessLog
from triogate.telemetry.metrics import Metrics
from triogate.telemetry.records import Observer

__all__ = ["ActiveConfig", "Gateway", "lmdb_path", "open_gateway"]

log = logging.getLogger("triogate.runtime.gateway")


class ActiveConfig(msgspec.Struct, frozen=True):
    config: Config
    version: str
    loaded_at: float
    source: str | None


class Gateway:
    def __init__(
        self,
        config: Config,
        store: Store,
        secrets: ServerSecrets,
        *,
        source: str | None = None,
        clock: Clock = system_clock,
    ) -> None:
        self.store = store
        self.secrets = secrets
        self.clock = clock
        self.active = ActiveConfig(config, config_version(config), time.time(), source)
        self.keys = KeyService(store, secrets, prefix=config.keys.prefix, clock=clock)
        self.admins = AdminService(store, secrets, clock=clock)
        self.audit = AuditLog(store)
        self.actors = ActorRegistry(
            store,
            flush_interval=config.storage.flush_interval_seconds,
            idle_timeout=config.storage.actor_idle_seconds,
            clock=clock,
        )
        self.keys.live_balance = self.actors.live_balance  # views show live credits
        # The data plane, once built (``serve``); the CLI never builds one.
        self.pipeline: Pipeline | None = None
        # Plugin classes not installed as entry points (tests, triogate.testing).
        self.extra_plugins: tuple[type[Plugin[Any]], ...] = ()
        # Told about every answered request, whichever pipeline (config)
        # served it: metrics, the access log.
        self.observers: list[Observer] = []
        # Telemetry (observers above). The access log's writer task is run by
        # the server, next to the actors; a reload keeps both ([log] is read
        # once, at start).
        self.access_log = AccessLog.from_config(config.log)
        self.metrics = Metrics(self, access_log=self.access_log)
        self.observers.append(self.metrics.observe)
        if self.access_log is not None:
            self.observers.append(self.access_log.observe)
        self.configs = ConfigManager(self)

    def refresh_secrets(self) -> None:
        """Re-read the server secrets (a reload does this): an HMAC version
        added by another process (``triogate secrets rotate-hmac``) becomes
        known here, so keys created under it validate. Secrets that went
        missing or changed under the running gateway are not taken: the ones
        in use stay, and the next start refuses (``core/datadir.py``)."""
        try:
            fresh = load_secrets(self.config.data_dir, create=False)
        except SecretsError as exc:
            log.error("keeping the secrets in use: %s", exc)
            return
        why = compare_fingerprints(self.secrets.fingerprints(), fresh.fingerprints())
        if why is not None:
            log.error(
                "keeping the secrets in use: %s are not the same secrets (%s)", fresh.source, why
            )
            return
        self.secrets.hmac = fresh.hmac
        self.secrets.sealer = fresh.sealer

    def current_pipeline(self) -> Pipeline:
        assert self.pipeline is not None, "the data plane is not built"
        return self.pipeline

    def build_pipeline(
        self, config: Config | None = None, *, previous: Pipeline | None = None
    ) -> Pipeline:
        """A complete data plane for ``config`` (default: the active one),
        keeping ``previous``'s unchanged upstreams. Raises ConfigError
        listing every route or plugin problem."""
        config = config or self.config
        default = config.keys.default_rate_limit
        env = PluginEnv(
            keys=self.keys,
            actors=self.actors,
            default_key_limit=(
                RateLimit("default", default.limit, default.period_seconds)
                if default is not None
                else None
            ),
            clock=self.clock,
        )
        registry = {**discover(), **{p.name: p for p in self.extra_plugins}}
        pipeline = Pipeline(config, registry, env, previous=previous)
        pipeline.observers = self.observers  # shared: survives reloads
        return pipeline

    @property
    def config(self) -> Config:
        return self.active.config

    def __repr__(self) -> str:
        return f"<Gateway config={self.active.version} store={self.store!r}>"


@asynccontextmanager
async def open_gateway(
    config: Config, *, source: str | None = None, clock: Clock = system_clock
) -> AsyncIterator[Gateway]:
    """The gateway on ``config.data_dir``, once the data directory proves to
    be what it was (``core/datadir.py``: else ``DataDirError``, one sentence)."""
    async with open_data_dir(
        config.data_dir, map_size=config.storage.map_size_mb << 20, full_error=StorageFull
    ) as (store, secrets):
        yield Gateway(config, store, secrets, source=source, clock=clock)
