"""``triogate serve``: one ``trio.run`` that owns the gateway.

Nurseries, outermost first (after hypercorn's run.py):
  gateway    storage (writer task) and services, closed last so everything
             above can still write while it drains;
  outer      the signal watcher, when asked for;
  listeners  the proxy listener (its connections in its own nursery) and the
             admin listener (hypercorn + quart-trio).

SIGHUP reloads the config file (see reload.py).

Shutdown: SIGTERM/SIGINT (or ``Server.shutdown()``) sets one event; both
listeners stop accepting, idle connections close, in-flight requests get
``shutdown_grace_seconds`` (then they are cancelled); then the storage writer
drains its queue and LMDB closes. Exit status 0.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from triogate import __version__
from triogate.admin.app import DrainUnreadBody, create_admin_app
from triogate.config import Config
from triogate.control.audit import Actor
from triogate.control.history import Retention
from triogate.control.timeutil import Clock, system_clock
from triogate.dataplane.asgi import GatewayASGI
from triogate.dataplane.health import run_health_checks
from triogate.dataplane.listener import ProxyListener
from triogate.dataplane.listenerstats import ListenerCollector
from triogate.dataplane.pipeline import Pipeline
from triogate.dataplane.plugin_tasks import run_plugin_tasks
from triogate.dataplane.sharedlimits import SharedLimits
from triogate.errors import ConfigError, FieldError, GatewayError
from triogate.plugins.contract import Plugin
from triogate.runtime.gateway import Gateway, open_gateway
from triogate.runtime.native import check_native
from triogate.runtime.reasons import install_reason_phrases
from triogate.runtime.reload import Applies, ConfigManager, Swap
from triogate.runtime.supervisor import ask_supervisor_to_reload
from triogate.storage.limits_file import discard_limits_env
from triogate.telemetry.logs import json_info_line

__all__ = ["Server", "ServerInfo"]

log = logging.getLogger("triogate.runtime.server")


class ServerInfo:
    def __init__(self, admin_url: str, proxy_url: str, data_dir: Path) -> None:
        self.admin_url = admin_url
        self.proxy_url = proxy_url
        self.data_dir = data_dir

    def __repr__(self) -> str:
        return (
            f"<ServerInfo proxy={self.proxy_url} admin={self.admin_url} data_dir={self.data_dir}>"
        )


ADMIN_GRACE_SECONDS = 1.0


def announce(line: str, *, as_json: bool = False) -> None:
    """One readiness line on stdout in one ``write``: several workers share
    the pipe, and a write below PIPE_BUF is never interleaved with another
    process's, so readers always see whole lines. ``as_json`` (``log.format
    = "json"``) writes it as a JSON log line: stdout stays pure JSON."""
    if as_json:
        line = json_info_line(line, "triogate.runtime.server")
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def _hypercorn_config(config: Config, listen: str) -> HypercornConfig:
    hc = HypercornConfig()
    hc.bind = [listen]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("triogate.hypercorn")
    # hypercorn 0.18 never marks a connection idle after a quart-trio
    # response, so neither its keep-alive timeout nor its shutdown closes
    # such a connection: the server would wait the whole grace period for
    # any client that keeps one open. Admin requests are short, so they get
    # a short grace of their own, and a connection silent for read_timeout
    # is closed.
    hc.graceful_timeout = min(config.server.shutdown_grace_seconds, ADMIN_GRACE_SECONDS)
    hc.read_timeout = int(config.server.idle_timeout_seconds)
    hc.h11_max_incomplete_size = config.server.max_header_bytes
    hc.keep_alive_timeout = config.server.idle_timeout_seconds
    return hc


class Server:
    """Runs one gateway until ``shutdown()`` or a signal. Use with
    ``await nursery.start(server.run)``; ``started`` hands back a ServerInfo."""

    def __init__(
        self,
        config: Config,
        *,
        source: str | None = None,
        handle_signals: bool = False,
        extra_plugins: Sequence[type[Plugin[Any]]] = (),
        worker: tuple[int, int] = (0, 1),
        clock: Clock = system_clock,
    ) -> None:
        self.config = config
        self.clock = clock  # the services' wall clock (tests move it by hand)
        self.worker = worker
        self._signalled_reload = False
        self.source = source
        self.handle_signals = handle_signals
        self.extra_plugins = tuple(extra_plugins)
        self.gateway: Gateway | None = None
        self.proxy: ProxyListener | None = None
        self._shutdown = trio.Event()
        self.stopped = trio.Event()
        self._tasks: trio.Nursery | None = None
        self._health: trio.CancelScope | None = None

    def __repr__(self) -> str:
        state = "stopping" if self._shutdown.is_set() else "running" if self.gateway else "idle"
        return f"<Server {state} {self.gateway!r}>"

    def shutdown(self) -> None:
        self._shutdown.set()

    async def _watch_signals(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self._reload_on_signal()
                    continue
                if self._shutdown.is_set():
                    # Keep the handler installed: a second signal (systemd
                    # signals the whole group) must not kill the drain.
                    log.info("received %s again: still draining", signal.Signals(signum).name)
                    continue
                log.info("received %s: shutting down", signal.Signals(signum).name)
                self.shutdown()

    async def _reload_on_signal(self) -> None:
        assert self.gateway is not None
        self._signalled_reload = True  # read by _on_reload, in this same call
        try:
            active = await self.gateway.configs.reload(Actor("signal:SIGHUP"))
        except ConfigError as exc:
            log.error("SIGHUP: config not reloaded; the old one keeps serving:\n%s", exc)
        except GatewayError as exc:
            log.error("SIGHUP: config not reloaded: %s", exc.detail)
        else:
            log.info("SIGHUP: config version %s is active", active.version)
        finally:
            self._signalled_reload = False

    def _on_reload(self, swap: Swap) -> None:
        """A new pipeline is live: put the other changed settings into force
        (``RELOAD_TABLE`` says whose they are), restart the health checks for
        its upstreams and retire the old pipeline once it is idle."""
        assert self._tasks is not None and self.gateway is not None
        config = swap.config
        # Restart-only settings cannot differ (the reload was refused).
        self.config = config
        # TLS: certificates are re-read on every reload (renewed files keep their names).
        tls = config.server.tls is not None
        if (Applies.LISTENER in swap.changed or tls) and self.proxy is not None:
            self.proxy.reconfigure(config.server)
        if Applies.ACTORS in swap.changed:
            self.gateway.actors.flush_interval = config.storage.flush_interval_seconds
            self.gateway.actors.idle_timeout = config.storage.actor_idle_seconds
            self.gateway.actors.retention = Retention(
                config.storage.usage_retention_days, config.storage.usage_minute_retention_hours
            )
        if Applies.LOGGING in swap.changed:
            logging.getLogger().setLevel(config.log.level)
        # Applies.SERVER (the shutdown grace) is read from self.config when used.
        if self._health is not None:
            self._health.cancel()
        self._health = trio.CancelScope()
        self._tasks.start_soon(self._run_health_checks, swap.new, self._health)
        grace = config.server.shutdown_grace_seconds
        self._tasks.start_soon(ConfigManager.retire, swap, grace)
        index, workers = self.worker
        if workers > 1 and index == 0 and not self._signalled_reload:
            # `POST /config/reload` reached this worker only: the supervisor
            # has the others read the file too (a SIGHUP already reached all).
            ask_supervisor_to_reload()

    async def _run_health_checks(self, pipeline: Pipeline, scope: trio.CancelScope) -> None:
        with scope:
            # The plugins' background work (a JWKS refresh) is the pipeline's too.
            async with trio.open_nursery() as tasks:
                tasks.start_soon(run_plugin_tasks, pipeline)
                await run_health_checks(pipeline.upstreams)

    async def run(
        self, *, task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED
    ) -> None:
        install_reason_phrases()  # hypercorn answers "200 OK", not "200 "
        # The pipeline is built before anything listens: a bad route or
        # plugin stops start-up with every error listed (ConfigError).
        async with open_gateway(
            self.config, source=self.source, clock=self.clock, extra_plugins=self.extra_plugins
        ) as gw:
            self.gateway = gw
            index, workers = self.worker
            if index == 0:  # once, however many workers
                log.info(
                    "triogate %s: config %s (version %s), data directory %s, %d route%s",
                    __version__,
                    self.source or "the built-in defaults",
                    gw.active.version,
                    self.config.data_dir,
                    len(self.config.routes),
                    "" if len(self.config.routes) == 1 else "s",
                )
                if not self.config.routes:
                    log.warning(
                        "no routes are configured: every proxied request will be "
                        "answered 404 ROUTE_NOT_FOUND"
                    )
            # Several workers decide limits and credits in one shared table.
            shared = SharedLimits.open(self.config.data_dir) if workers > 1 else None
            if workers == 1:
                # One process spends what the table would not see: a later
                # start with workers must not find its stale balances.
                discard_limits_env(self.config.data_dir)
            gw.actors.set_worker(index, workers, shared)
            app = DrainUnreadBody(create_admin_app(gw))
            if self.config.server.proxy_server == "native":
                # Its connection cap (and the line saying it was lowered) is
                # the native listener's: hypercorn has none.
                self.proxy = ProxyListener(
                    self.config.server, gw.current_pipeline, reuse_port=self.worker[1] > 1
                )
                gw.metrics.registry.register(ListenerCollector(self.proxy.statistics))
            elif self.config.server.tls is not None:  # `serve --server hypercorn`
                # Never plain HTTP where HTTPS was configured.
                raise ConfigError(
                    [FieldError("server.tls", "TLS is the native listener's, not hypercorn's")],
                    "--server hypercorn",
                )
            try:
                async with trio.open_nursery() as tasks:
                    # The actors (and these config-bound tasks) outlive the
                    # listeners: the final flush runs after the last
                    # request, before storage closes.
                    self._tasks = tasks
                    await tasks.start(gw.actors.run)
                    # Data-plane events' writer; worker 0 delivers webhooks.
                    await tasks.start(partial(gw.events.run, deliver=index == 0))
                    if gw.access_log is not None:
                        # Outlives the listeners too: drains the last lines.
                        await tasks.start(gw.access_log.run)
                    self._health = trio.CancelScope()
                    tasks.start_soon(self._run_health_checks, gw.pipeline, self._health)
                    gw.configs.hooks.append(self._on_reload)
                    await self._serve(app, task_status)
                    tasks.cancel_scope.cancel()
            finally:
                self._tasks = None
            log.info("listeners stopped; flushing storage")
        self.gateway = None
        self.stopped.set()

    async def _serve(self, app: Any, task_status: trio.TaskStatus[ServerInfo]) -> None:
        assert self.gateway is not None
        async with trio.open_nursery() as outer:
            if self.handle_signals:
                await outer.start(self._watch_signals)
            async with trio.open_nursery() as listeners:
                if self.proxy is None:  # proxy_server = "hypercorn"
                    proxy_binds = await listeners.start(
                        partial(
                            hypercorn_serve,
                            GatewayASGI(self.gateway.current_pipeline),
                            _hypercorn_config(self.config, self.config.server.proxy_listen),
                            shutdown_trigger=self._shutdown.wait,
                        )
                    )
                    proxy_url = proxy_binds[0]
                else:
                    proxy_url = await listeners.start(self.proxy.run)
                admin_url = ""
                if self.worker[0] == 0:  # one admin API, however many workers
                    binds = await listeners.start(
                        partial(
                            hypercorn_serve,
                            app,
                            _hypercorn_config(self.config, self.config.server.admin_listen),
                            shutdown_trigger=self._shutdown.wait,
                        )
                    )
                    admin_url = binds[0]
                info = ServerInfo(
                    admin_url=admin_url, proxy_url=proxy_url, data_dir=self.config.data_dir
                )
                if self.gateway.cluster is not None:  # its heartbeat names them
                    self.gateway.cluster.announce(proxy_url=proxy_url, admin_url=admin_url)
                # Lines on stdout that scripts (and tests) can wait for.
                suffix = f" (worker {self.worker[0]})" if self.worker[1] > 1 else ""
                as_json = self.config.log.format == "json"
                announce(f"triogate: proxy listening on {info.proxy_url}{suffix}", as_json=as_json)
                if admin_url:
                    announce(f"triogate: admin listening on {info.admin_url}", as_json=as_json)
                task_status.started(info)
                await self._shutdown.wait()
                if self.proxy is not None:
                    self.proxy.shutdown()
                # In-flight requests get the grace period, then are cancelled.
                grace = self.config.server.shutdown_grace_seconds
                listeners.cancel_scope.deadline = trio.current_time() + grace
            # The listeners are done; the signal watcher can go.
            outer.cancel_scope.cancel()


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (the default soft
    limit, often 1,024, is far below what a proxy holding thousands of
    connections needs), say so in one log line, and return the soft limit
    now in force (the proxy listener sizes its connection cap from it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        # Linux refuses an infinite RLIMIT_NOFILE; nr_open is the real ceiling.
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            return soft
    if soft == resource.RLIM_INFINITY or soft >= target:
        log.info("file-descriptor limit: %d", soft)
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("file-descriptor limit stays at %d: raising it failed: %s", soft, exc)
        return soft
    log.info("file-descriptor limit raised from %d to %d (the hard limit)", soft, target)
    return target


def run_server(
    config: Config, *, source: str | None = None, worker: tuple[int, int] = (0, 1)
) -> int:
    raise_fd_limit()
    try:
        native = check_native()  # never the old compiled code of an edited source
    except RuntimeError as exc:
        print(f"triogate: {exc}", file=sys.stderr)
        return 1
    if worker[0] == 0:
        log.info("data plane: %s", native.describe())
    server = Server(config, source=source, handle_signals=True, worker=worker)
    try:
        trio.run(server.run)
    except ConfigError as exc:
        for line in exc.lines():
            print(f"{exc.source}: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        print("triogate: interrupted", file=sys.stderr)
        return 130
    return 0
