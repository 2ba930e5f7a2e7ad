"""Hot reload: SIGHUP or ``POST /config/reload``.

Theory of operation
-------------------
A reload reads the file ``serve -c`` was given, validates it completely
(every error, with its path), builds a whole new router and plugin chains,
and only then swaps one reference: ``gateway.pipeline``. A request reads
that reference once, when it starts, so in-flight requests finish on the
config they began with, and nothing ever sees half a config. A bad file
changes nothing: the old config keeps serving.

What carries over: the per-key actors (they belong to the gateway, not to a
config), so rate-limit state, credits and usage go on; and every upstream
whose settings did not change keeps its connection pools, breakers, health
and retry budget. Upstreams that went away are closed once the old pipeline
has no request in flight (or after the shutdown grace period).

Settings that need new sockets or another data directory (listen
addresses, data_dir, workers, the proxy front door, the key prefix, the
LMDB map size, where the logs go) cannot change in place: a reload that
changes them is refused with those fields listed. Everything else applies
at once: routes, plugins, upstreams, the listener's timeouts and size caps,
the shutdown grace, the actors' flush interval and idle time, the log level.

The last ``HISTORY`` configs are kept with their version ids (a content
hash) and load times; ``GET /config`` shows them.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from triogate.config import Config, ConfigError, config_version, load_config
from triogate.control.audit import Actor, append_audit
from triogate.errors import Conflict, FieldError

if TYPE_CHECKING:
    from triogate.dataplane.pipeline import Pipeline
    from triogate.runtime.gateway import ActiveConfig, Gateway

__all__ = ["ConfigManager"]

log = logging.getLogger("triogate.runtime.reload")

HISTORY: Final = 5

# (section, field) pairs that cannot change without a restart.
_NEEDS_RESTART: Final = (
    ("server", "proxy_listen"),
    ("server", "admin_listen"),
    ("server", "data_dir"),
    ("server", "workers"),
    ("server", "proxy_server"),
    ("keys", "prefix"),
    ("storage", "map_size_mb"),
    ("log", "format"),
    ("log", "access_log"),
    ("log", "access_log_queue"),
)

ReloadHook = Callable[["Pipeline", "Pipeline"], None]


def _needs_restart(old: Config, new: Config) -> list[FieldError]:
    errors = []
    for section, name in _NEEDS_RESTART:
        before = getattr(getattr(old, section), name)
        after = getattr(getattr(new, section), name)
        if before != after:
            errors.append(
                FieldError(
                    f"{section}.{name}",
                    f"changing it needs a restart ({before!r} -> {after!r}); "
                    "the running config is unchanged",
                )
            )
    return errors


class ConfigManager:
    """The gateway's config history and the one way to change it live."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.history: deque[ActiveConfig] = deque([gateway.active], maxlen=HISTORY)
        self.hooks: list[ReloadHook] = []
        self.reloads = 0
        self._lock = trio.Lock()

    def __repr__(self) -> str:
        return f"<ConfigManager active={self.gateway.active.version} reloads={self.reloads}>"

    async def reload(self, actor: Actor) -> ActiveConfig:
        """Re-read the config file and swap it in, or raise ConfigError
        (every error listed) / Conflict (nothing to reload from)."""
        from triogate.runtime.gateway import ActiveConfig

        gw = self.gateway
        source = gw.active.source
        if source is None:
            raise Conflict("the gateway was started without a config file: nothing to reload")
        async with self._lock:  # one reload at a time
            await trio.lowlevel.checkpoint()
            config = load_config(Path(source))
            errors = _needs_restart(gw.config, config)
            if errors:
                # Refused before anything is built: building binds plugins
                # to the live upstreams (breakers), which must stay as they are.
                raise ConfigError(errors, source)
            old = gw.current_pipeline()
            try:
                new = gw.build_pipeline(config, previous=old)
            except ConfigError as exc:
                raise ConfigError(exc.errors, source) from None
            gw.refresh_secrets()  # pick up `triogate secrets rotate-hmac`
            previous = gw.active
            gw.active = ActiveConfig(config, config_version(config), time.time(), source)
            gw.pipeline = new  # the swap: the next request uses the new config
            self.history.append(gw.active)
            self.reloads += 1
            for hook in self.hooks:
                hook(old, new)

            def audit(txn: object) -> None:
                append_audit(
                    txn,  # type: ignore[arg-type]
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

    async def retire(self, old: Pipeline, new: Pipeline, grace: float) -> None:
        """Close what the new pipeline did not keep, once the old one has
        no request in flight (at most ``grace`` seconds from now)."""
        with trio.move_on_after(grace):
            await old.wait_idle()
        kept = {id(u) for u in new.upstreams.values()}
        for upstream in old.upstreams.values():
            if id(upstream) not in kept:
                upstream.close()
