"""Hot reload: SIGHUP or ``POST /config/reload``.

Theory of operation
-------------------
A reload reads the file ``serve -c`` was given, validates it completely
(every error, with its path), and then decides, then acts:

1. *Decide.* ``RELOAD_TABLE`` says, for every setting, who puts a change
   into force; a change to a ``RESTART`` setting refuses the reload with
   those fields listed. Then the new data plane is planned
   (``triogate.dataplane.plan``): router, plugin chains, every plugin's
   ``bind``, which upstreams are kept, created or retired, which breakers
   the targets get. Planning reads the live pipeline and writes nothing, so
   a refused config (a bad route, a plugin's ``bind`` raising) changes
   nothing: the old config keeps serving with its breakers, pools and
   health state exactly as they were.
2. *Act*, with no checkpoint in between (no request can run between the
   plan and its application): the plan is applied (breakers installed),
   and one reference is swapped: ``gateway.pipeline``. A request reads that
   reference once, when it starts, so in-flight requests finish on the
   config they began with, and nothing ever sees half a config. The hooks
   (the server's) then put the other changed settings into force, as the
   table says, and close the retired upstreams once the old pipeline has no
   request in flight (or after the shutdown grace period).

What carries over: the per-key actors (they belong to the gateway, not to a
config), so rate-limit state, credits and usage go on; and every upstream
whose settings did not change keeps its connection pools, breakers, health
and retry budget.

The last ``HISTORY`` configs are kept with their version ids (a content
hash) and load times; ``GET /config`` shows them.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import msgspec
import trio

from triogate.config import Config, config_version, load_config
from triogate.control.audit import Actor, append_audit
from triogate.dataplane.pipeline import Pipeline
from triogate.dataplane.plan import PipelinePlan
from triogate.dataplane.upstream import Upstream
from triogate.errors import ConfigError, Conflict, FieldError
from triogate.storage import Store, WriteTxn

__all__ = [
    "HISTORY",
    "RELOAD_TABLE",
    "ActiveConfig",
    "Applies",
    "ConfigManager",
    "ReloadHook",
    "Reloadable",
    "Swap",
    "changed_settings",
    "restart_errors",
]

log = logging.getLogger("triogate.runtime.reload")

HISTORY: Final = 5


class ActiveConfig(msgspec.Struct, frozen=True):
    """A config as it was loaded: its content hash and when."""

    config: Config
    version: str
    loaded_at: float
    source: str | None


class Applies(enum.Enum):
    """Who puts a changed setting into force."""

    RESTART = "restart"  # new sockets or another data directory: a reload is refused
    PIPELINE = "pipeline"  # the new pipeline itself, by the swap
    LISTENER = "listener"  # the proxy listener (``ProxyListener.reconfigure``)
    SERVER = "server"  # the server's own shutdown grace
    ACTORS = "actors"  # the key actors' flush interval and idle time
    LOGGING = "logging"  # the root logger's level
    KEYS = "keys"  # the key service's keyspaces (``Gateway.use_keyspaces``)


# Every setting, and what a reload does with a change to it: the one place
# that decides (docs/configuration.md says the same; a test compares them,
# another checks that every field of ``Config`` is here). A whole section
# (``routes``) stands for everything under it.
RELOAD_TABLE: Final[Mapping[str, Applies]] = {
    "server.proxy_listen": Applies.RESTART,
    "server.admin_listen": Applies.RESTART,
    "server.data_dir": Applies.RESTART,
    "server.workers": Applies.RESTART,
    "server.proxy_server": Applies.RESTART,
    "server.shutdown_grace_seconds": Applies.SERVER,
    "server.max_request_body_bytes": Applies.PIPELINE,
    "server.max_header_bytes": Applies.LISTENER,
    "server.header_timeout_seconds": Applies.LISTENER,
    "server.idle_timeout_seconds": Applies.LISTENER,
    "server.body_timeout_seconds": Applies.LISTENER,
    "server.body_deadline_seconds": Applies.LISTENER,
    "server.max_connections": Applies.LISTENER,
    "server.underscores_in_headers": Applies.LISTENER,
    "server.allow_path_parameters": Applies.LISTENER,
    # The certificates are re-read on every reload, changed or not (server.py).
    "server.tls": Applies.LISTENER,
    "keys.prefix": Applies.RESTART,
    "keys.default_rate_limit": Applies.PIPELINE,  # lent to the plugins (PluginEnv)
    "keys.import_formats": Applies.KEYS,  # which foreign keys are looked up
    "storage.map_size_mb": Applies.RESTART,
    "storage.flush_interval_seconds": Applies.ACTORS,
    "storage.actor_idle_seconds": Applies.ACTORS,
    "storage.usage_retention_days": Applies.ACTORS,  # the next prune uses it
    "storage.usage_minute_retention_hours": Applies.ACTORS,
    "log.level": Applies.LOGGING,
    "log.format": Applies.RESTART,
    "log.access_log": Applies.RESTART,
    "log.access_log_queue": Applies.RESTART,
    "plugins": Applies.PIPELINE,
    "upstreams": Applies.PIPELINE,
    "routes": Applies.PIPELINE,
    "api_versions": Applies.PIPELINE,
    "keyspaces": Applies.KEYS,
    # Read once at start by the event service (core/events): restart.
    "events.webhooks": Applies.RESTART,
    "events.credits_low_percent": Applies.RESTART,
    "events.timeout_seconds": Applies.RESTART,
    "events.max_attempts": Applies.RESTART,
    "events.retry_base_seconds": Applies.RESTART,
    "events.retry_max_seconds": Applies.RESTART,
    "events.retention_days": Applies.RESTART,
    # Read once at start by the cluster service (core/cluster): restart.
    "cluster.redis_url": Applies.RESTART,
    "cluster.fallback": Applies.RESTART,
    "cluster.connect_timeout_seconds": Applies.RESTART,
    "cluster.command_timeout_seconds": Applies.RESTART,
    "cluster.health_interval_seconds": Applies.RESTART,
    "cluster.batch_max": Applies.RESTART,
    "cluster.local_routes": Applies.RESTART,
    "cluster.local_keyspaces": Applies.RESTART,
    # Read from the active config by the console (core/console) at each request.
    "admin.console": Applies.SERVER,
    "admin.session_idle_seconds": Applies.SERVER,
}


def _value(config: Config, path: str) -> object:
    value: object = config
    for step in path.split("."):
        value = getattr(value, step)
    return value


def _changed(old: Config, new: Config) -> list[tuple[str, Applies]]:
    return [
        (path, how) for path, how in RELOAD_TABLE.items() if _value(old, path) != _value(new, path)
    ]


def restart_errors(old: Config, new: Config) -> list[FieldError]:
    """One error per restart-only setting that differs."""
    return [
        FieldError(
            path,
            f"changing it needs a restart ({_value(old, path)!r} -> {_value(new, path)!r}); "
            "the running config is unchanged",
        )
        for path, how in _changed(old, new)
        if how is Applies.RESTART
    ]


def changed_settings(old: Config, new: Config) -> frozenset[Applies]:
    """Who has a changed setting to put into force."""
    return frozenset(how for _, how in _changed(old, new))


@dataclass(frozen=True, repr=False)
class Swap:
    """A reload that happened: what the hooks act on."""

    old: Pipeline
    new: Pipeline
    #: Upstreams the new pipeline did not keep: to close once ``old`` is idle.
    retired: tuple[Upstream, ...]
    config: Config
    changed: frozenset[Applies]

    def __repr__(self) -> str:
        changed = ", ".join(sorted(a.value for a in self.changed)) or "nothing"
        return f"<Swap {self.old!r} -> {self.new!r}, {len(self.retired)} retired; {changed}>"


ReloadHook = Callable[[Swap], None]


class Reloadable(Protocol):
    """What a reload changes: the runtime's ``Gateway``."""

    active: ActiveConfig
    pipeline: Pipeline

    @property
    def store(self) -> Store: ...
    @property
    def clock(self) -> Callable[[], float]: ...
    def plan_pipeline(self, config: Config, previous: Pipeline | None) -> PipelinePlan: ...
    def make_pipeline(self, plan: PipelinePlan) -> Pipeline: ...
    def refresh_secrets(self) -> None: ...


class ConfigManager:
    """The gateway's config history and the one way to change it live."""

    def __init__(self, gateway: Reloadable) -> None:
        self.gateway = gateway
        self.history: deque[ActiveConfig] = deque([gateway.active], maxlen=HISTORY)
        self.hooks: list[ReloadHook] = []
        self.reloads = 0
        self._lock = trio.Lock()

    def __repr__(self) -> str:
        return f"<ConfigManager active={self.gateway.active.version} reloads={self.reloads}>"

    @property
    def active(self) -> ActiveConfig:
        return self.gateway.active

    async def reload(self, actor: Actor) -> ActiveConfig:
        """Re-read the config file and swap it in, or raise ConfigError
        (every error listed) / Conflict (nothing to reload from)."""
        gw = self.gateway
        source = gw.active.source
        if source is None:
            raise Conflict("the gateway was started without a config file: nothing to reload")
        async with self._lock:  # one reload at a time
            await trio.lowlevel.checkpoint()
            # ---- decide: nothing live changes here ----
            config = load_config(Path(source))
            errors = restart_errors(gw.active.config, config)
            if errors:
                raise ConfigError(errors, source)
            old = gw.pipeline
            try:
                plan = gw.plan_pipeline(config, old)
            except ConfigError as exc:
                raise ConfigError(exc.errors, source) from None
            changed = changed_settings(gw.active.config, config)
            # ---- act: no checkpoint from here to the swap ----
            gw.refresh_secrets()  # pick up `triogate secrets rotate-hmac`
            new = gw.make_pipeline(plan)
            previous = gw.active
            gw.active = ActiveConfig(config, config_version(config), time.time(), source)
            gw.pipeline = new  # the swap: the next request uses the new config
            self.history.append(gw.active)
            self.reloads += 1
            swap = Swap(old, new, plan.upstreams.retire, config, changed)
            for hook in self.hooks:
                hook(swap)

            def audit(txn: WriteTxn) -> None:
                append_audit(
                    txn,
                    actor=actor,
                    action="config.reload",
                    target_id=None,
                    now=gw.clock(),
                    details={"version": gw.active.version, "previous": previous.version},
                )

            await gw.store.write(audit)
            log.info(
                "config reloaded from %s: version %s (was %s)",
                source,
                gw.active.version,
                previous.version,
            )
            return gw.active

    @staticmethod
    async def retire(swap: Swap, grace: float) -> None:
        """Close the upstreams the new pipeline did not keep, once the old
        one has no request in flight (at most ``grace`` seconds from now)."""
        with trio.move_on_after(grace):
            await swap.old.wait_idle()
        for upstream in swap.retired:
            upstream.close()
