"""``triogate serve``: one ``trio.run`` that owns the gateway.

Nurseries, outermost first (after hypercorn's run.py):
  gateway   storage (writer task) and services, closed last so everything
            above can still write while it drains;
  server    the admin listener (hypercorn + quart-trio) and, when asked for,
            the signal watcher.

Shutdown: SIGTERM/SIGINT (or ``Server.shutdown()``) sets one event; hypercorn
stops accepting and gives in-flight requests ``shutdown_grace_seconds``; then
the storage writer drains its queue and LMDB closes. Exit status 0.
"""

from __future__ import annotations

import logging
import signal
import sys
from functools import partial
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .admin.app import create_admin_app
from .config import Config
from .gateway import Gateway, open_gateway

__all__ = ["Server", "ServerInfo"]

log = logging.getLogger("triogate.server")


class ServerInfo:
    def __init__(self, admin_url: str, data_dir: Path) -> None:
        self.admin_url = admin_url
        self.data_dir = data_dir

    def __repr__(self) -> str:
        return f"<ServerInfo admin={self.admin_url} data_dir={self.data_dir}>"


def _hypercorn_config(config: Config) -> HypercornConfig:
    hc = HypercornConfig()
    hc.bind = [config.server.admin_listen]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("triogate.hypercorn")
    hc.graceful_timeout = config.server.shutdown_grace_seconds
    hc.h11_max_incomplete_size = config.server.max_header_bytes
    hc.keep_alive_timeout = 75
    return hc


class Server:
    """Runs one gateway until ``shutdown()`` or a signal. Use with
    ``await nursery.start(server.run)``; ``started`` hands back a ServerInfo."""

    def __init__(
        self, config: Config, *, source: str | None = None, handle_signals: bool = False
    ) -> None:
        self.config = config
        self.source = source
        self.handle_signals = handle_signals
        self.gateway: Gateway | None = None
        self._shutdown = trio.Event()

    def __repr__(self) -> str:
        state = "stopping" if self._shutdown.is_set() else "running" if self.gateway else "idle"
        return f"<Server {state} {self.gateway!r}>"

    def shutdown(self) -> None:
        self._shutdown.set()

    async def _watch_signals(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                log.info("received %s: shutting down", signal.Signals(signum).name)
                self.shutdown()
                return

    async def run(
        self, *, task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with open_gateway(self.config, source=self.source) as gw:
            self.gateway = gw
            app = create_admin_app(gw)
            async with trio.open_nursery() as outer:
                if self.handle_signals:
                    await outer.start(self._watch_signals)
                async with trio.open_nursery() as listeners:
                    binds = await listeners.start(
                        partial(
                            hypercorn_serve,
                            app,
                            _hypercorn_config(self.config),
                            shutdown_trigger=self._shutdown.wait,
                        )
                    )
                    info = ServerInfo(admin_url=binds[0], data_dir=self.config.data_dir)
                    # One line on stdout that scripts (and tests) can wait for.
                    print(f"triogate: admin listening on {info.admin_url}", flush=True)
                    task_status.started(info)
                # hypercorn has returned: in-flight requests are done or the
                # grace period is over. The signal watcher can go.
                outer.cancel_scope.cancel()
            log.info("admin listener stopped; flushing storage")
        self.gateway = None


def run_server(config: Config, *, source: str | None = None) -> int:
    server = Server(config, source=source, handle_signals=True)
    try:
        trio.run(server.run)
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        print("triogate: interrupted", file=sys.stderr)
        return 130
    return 0
