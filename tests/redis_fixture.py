"""A real ``redis-server`` for the cluster tests, on a free loopback port in a
temp directory, stopped after the test.

Use the pytest fixtures (import them into the test module; pytest finds a
fixture by the name it is bound to)::

    from tests.redis_fixture import redis_server, redis_url  # noqa: F401

    async def test_x(redis_url: str) -> None: ...

    def test_outage(redis_server: RedisServer) -> None:
        redis_server.kill()        # SIGKILL, like a crash
        redis_server.restart()     # same port, same directory

or the plain context manager, for subprocess-level tests that manage their
own lifetimes::

    with running_redis(tmp_path / "redis") as server:
        start_serve(..., env={"TRIOGATE_CLUSTER__REDIS_URL": server.url})

The server runs with ``--save "" --appendonly no`` unless ``persistence=True``
(then ``appendonly yes``, ``appendfsync always``, so a restart keeps what was
acknowledged). A machine without ``redis-server`` FAILS the test, naming
``tests/system/install.sh``: a cluster test never silently skips.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

__all__ = [
    "RedisServer",
    "redis_server",
    "redis_server_binary",
    "redis_url",
    "running_redis",
]

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0

MISSING = (
    "redis-server is not installed: the cluster tests start a real one. "
    "Run `sh tests/system/install.sh` (it installs the Debian package redis-server), "
    "or `apt-get install redis-server`."
)


def redis_server_binary() -> str:
    """The ``redis-server`` path, or a failed test that says how to install it."""
    found = shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.path.exists(p)),
        None,
    )
    if found is None:
        pytest.fail(MISSING, pytrace=False)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One ``redis-server`` child process on ``127.0.0.1:port`` in ``directory``."""

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        persistence: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.directory = directory
        self.port = port if port is not None else _free_port()
        self.persistence = persistence
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __repr__(self) -> str:
        return f"RedisServer({self.url}, running={self.running})"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _args(self) -> list[str]:
        args = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_path),
            # The tests start many servers: no protected-mode surprises, no
            # background threads left behind by an unclean stop.
            "--protected-mode",
            "no",
        ]
        if self.persistence:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        return args + list(self.extra_args)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server and wait (bounded) until it answers PING."""
        if self.running:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self._args(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.proc.returncode} on port {self.port}:\n"
                    + self.log()
                )
            if self.ping():
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server did not answer PING within {timeout}s:\n{self.log()}")

    def ping(self, timeout: float = 0.5) -> bool:
        """True when the server answers ``PING`` with ``+PONG`` (plain socket, no client)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str, timeout: float = 2.0) -> bytes:
        """One raw RESP command, the raw reply (for tests that poke the server)."""
        out = [f"*{len(args)}\r\n".encode()]
        for a in args:
            b = a.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(b"".join(out))
            return s.recv(65536)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL if it has not gone within ``timeout``."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: the outage tests' crash."""
        self._end(signal.SIGKILL, STOP_TIMEOUT)

    def _end(self, sig: int, timeout: float) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """Stop if running, then start again on the same port and directory.

        The port stays reserved by nobody in between, so a test should restart
        promptly; a clash shows as a clear start error rather than a hang.
        """
        self.stop()
        self.start(timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no redis log)"


@contextlib.contextmanager
def running_redis(
    directory: Path | None = None,
    *,
    persistence: bool = False,
    extra_args: Sequence[str] = (),
) -> Iterator[RedisServer]:
    """A started server, stopped (SIGKILL if SIGTERM does not end it) on exit."""
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="redis-")))
        server = RedisServer(directory, persistence=persistence, extra_args=extra_args)
        stack.callback(server.stop)
        server.start()
        yield server


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server for this test (killable, restartable on the same port)."""
    with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """``redis://127.0.0.1:PORT/0`` of this test's own redis-server."""
    return redis_server.url
