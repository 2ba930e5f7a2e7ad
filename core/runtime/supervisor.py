"""``server.workers = N``: N gateway processes on one LMDB environment.

The supervisor (the process ``triogate serve`` started) runs no gateway of
its own. It starts N workers (``triogate serve --worker I``), each a whole
gateway in its own ``trio.run``; they share the proxy port through
``SO_REUSEPORT`` (the kernel spreads connections across them) and the data
directory through LMDB (multi-process safe). Worker 0 also serves the admin
API; the others serve only the proxy.

The supervisor forwards SIGHUP to every worker (each reloads the file
itself), and a reload made through worker 0's ``POST /config/reload``
reaches the others the same way (worker 0 signals ``PEER_RELOAD``).
It forwards SIGTERM/SIGINT to every worker and waits for them
(each drains its in-flight requests and flushes its actors), and restarts a
worker that dies on its own, with a growing back-off so a crash loop does
not spin. A supervisor that dies without stopping them (SIGKILL, the OOM
killer) takes them along: on Linux each worker is started with
``prctl(PR_SET_PDEATHSIG, SIGTERM)``, so the kernel sends it SIGTERM (it
drains and flushes as on a stop) rather than leaving it serving, orphaned,
on the port.

Limits across workers (see docs/rate-limits.md): every rate-limit and
credit decision is made in a table all workers share
(``triogate.dataplane.sharedlimits``, ``<data_dir>/limits/``), so both are
exact whichever worker a connection lands on.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType

__all__ = ["ask_supervisor_to_reload", "run_supervisor"]

log = logging.getLogger("triogate.runtime.supervisor")

RESTART_BACKOFF_MAX = 30.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Worker 0 to its supervisor: "I reloaded the config; have the others do it".
PEER_RELOAD = signal.SIGUSR1
# The supervisor's pid, in each worker's environment: a worker signals its
# parent only when the parent is that supervisor. ``serve --worker 0`` run by
# hand has a shell (or systemd) for a parent, which SIGUSR1 would kill.
SUPERVISOR_ENV = "TRIOGATE_SUPERVISOR_PID"


def ask_supervisor_to_reload() -> bool:
    """Worker 0, after ``POST /config/reload``: have the supervisor reload
    the other workers. False (nothing sent) when this process is not a
    worker of a live supervisor."""
    parent = os.getppid()
    if os.environ.get(SUPERVISOR_ENV) != str(parent) or parent <= 1:
        log.warning(
            "config reloaded in this worker only: it was not started by a triogate "
            "supervisor (the other workers, if any, need a SIGHUP)"
        )
        return False
    os.kill(parent, PEER_RELOAD)
    return True


def _die_with_supervisor() -> Callable[[], None] | None:
    """The hook run in a new worker before it executes (Linux; None
    elsewhere): SIGTERM for it when this process dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    supervisor = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != supervisor:  # it died before the line above
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


class _Worker:
    def __init__(self, index: int, argv: Sequence[str]) -> None:
        self.index = index
        self.argv = list(argv)
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.started_at = 0.0

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"<worker {self.index} pid={pid} restarts={self.restarts}>"

    def start(self) -> None:
        # (No threads here, so a pre-exec hook is safe.)
        env = {**os.environ, SUPERVISOR_ENV: str(os.getpid())}
        self.proc = subprocess.Popen(self.argv, preexec_fn=_die_with_supervisor(), env=env)
        self.started_at = time.monotonic()


def run_supervisor(config_path: str | None, workers: int, server: str | None) -> int:
    base = [sys.executable, "-m", "triogate", "serve"]
    if config_path:
        base += ["-c", config_path]
    if server:
        base += ["--server", server]
    pool = [_Worker(i, [*base, "--worker", str(i)]) for i in range(workers)]
    stopping = False
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        received.append(signum)
        for w in pool:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signum)

    def on_hup(signum: int, frame: FrameType | None) -> None:
        # Every worker reloads the file itself (each validates it the same way).
        for w in pool:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGHUP)

    def on_peer_reload(signum: int, frame: FrameType | None) -> None:
        # Worker 0 reloaded through `POST /config/reload` (it serves the only
        # admin API): the others read the file too, so every worker serves it.
        for w in pool:
            if w.index != 0 and w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGHUP)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(PEER_RELOAD, on_peer_reload)
    for w in pool:
        w.start()
    # stderr: stdout is the access log and readiness lines (pure JSON with
    # log.format = "json").
    print(f"triogate: supervising {workers} workers", file=sys.stderr, flush=True)

    backoff = {w.index: 0.5 for w in pool}
    while True:
        alive = False
        for w in pool:
            if w.proc is None:
                continue  # not restarted: the stop came first
            code = w.proc.poll()
            if code is None:
                alive = True
                continue
            if stopping:
                continue
            # Died on its own: bring it back, more slowly each time it
            # dies young.
            if time.monotonic() - w.started_at > 60:
                backoff[w.index] = 0.5
            log.error(
                "worker %d exited with %s; restarting in %.1f s", w.index, code, backoff[w.index]
            )
            time.sleep(backoff[w.index])
            if stopping:
                # The stop came during the back-off: nothing to restart, and
                # the death (logged above) is not the stop's exit status.
                w.proc = None
                continue
            backoff[w.index] = min(backoff[w.index] * 2, RESTART_BACKOFF_MAX)
            w.restarts += 1
            w.start()
            alive = True
        if not alive:
            break
        time.sleep(0.1)
    codes = [w.proc.returncode if w.proc else 0 for w in pool]
    return 0 if all(c == 0 for c in codes) else 1
