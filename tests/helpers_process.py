"""Run the real ``triogate`` executable as a subprocess (process-level tests).

* ``start_serve`` launches ``triogate serve [-c FILE]`` and waits (bounded) for
  the readiness line ``triogate: admin listening on http://HOST:PORT`` on
  stdout. stdout is drained by a background thread so the pipe never fills;
  stderr goes to a file that failure messages quote.
* ``ServeProcess.stop`` sends SIGTERM (or another signal), waits, and kills on
  timeout; ``ServeProcess.kill`` is an immediate SIGKILL (no graceful path).
* ``run_cli`` runs one CLI command to completion.
* ``clean_env`` is the environment every child gets: the test process's own
  environment minus every ``TRIOGATE_*`` variable (secrets and config
  overrides), plus whatever a test passes explicitly.
* ``free_ports`` picks loopback ports for a child to listen on;
  ``threaded_upstream`` is a plain upstream (200 "ok") in a thread, for a
  child gateway to proxy to.
"""

from __future__ import annotations

import http.server
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

__all__ = [
    "READY_RE",
    "ServeProcess",
    "clean_env",
    "free_ports",
    "run_cli",
    "serving",
    "start_serve",
    "threaded_upstream",
    "triogate_command",
    "wait_for_workers",
    "write_config",
]

READY_RE = re.compile(r"^triogate: admin listening on (http://127\.0\.0\.1:\d+)\s*$")
PROXY_RE = re.compile(r"^triogate: proxy listening on (http://\S+)\s*$")
DEFAULT_START_TIMEOUT = 20.0


def readiness_text(line: str) -> str:
    """A stdout line's text: with ``log.format = "json"`` the readiness lines
    are JSON log lines, their text in ``message``."""
    if line.startswith("{"):
        try:
            message = json.loads(line).get("message")
        except ValueError:
            return line
        return message if isinstance(message, str) else line
    return line


def triogate_command() -> list[str]:
    """The installed console script next to this interpreter, else ``-m triogate``."""
    script = Path(sys.executable).parent / "triogate"
    if script.exists():
        return [str(script)]
    found = shutil.which("triogate")
    if found:
        return [found]
    return [sys.executable, "-m", "triogate"]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOGATE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONWARNINGS", None)
    if extra:
        env.update(extra)
    return env


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot write {value!r} as TOML")


def write_config(path: Path, data_dir: Path, **server: Any) -> Path:
    """A config with ephemeral loopback ports and ``data_dir``; ``server``
    entries add to or override the ``[server]`` table."""
    table: dict[str, Any] = {
        "admin_listen": "127.0.0.1:0",
        "proxy_listen": "127.0.0.1:0",
        "data_dir": str(data_dir),
        "shutdown_grace_seconds": 5,
        **server,
    }
    lines = ["[server]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class ServeProcess:
    """One running ``triogate serve``."""

    def __init__(self, proc: subprocess.Popen[bytes], stderr_path: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr_path
        self.url = ""
        self.stdout_lines: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def __repr__(self) -> str:
        return f"<ServeProcess pid={self.proc.pid} url={self.url} rc={self.proc.returncode}>"

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\r\n")
            self.stdout_lines.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = DEFAULT_START_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise AssertionError(
                    f"triogate serve not ready after {timeout}s\n"
                    f"stdout: {self.stdout_lines}\nstderr:\n{self.stderr()}"
                )
            try:
                line = self._lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if line is None:
                rc = self.proc.wait(5)
                raise AssertionError(
                    f"triogate serve exited with status {rc} before it was ready\n"
                    f"stdout: {self.stdout_lines}\nstderr:\n{self.stderr()}"
                )
            m = READY_RE.match(readiness_text(line))
            if m:
                self.url = m.group(1)
                return self.url

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def proxy_url(self) -> str:
        """The proxy listener's URL, from its readiness line."""
        for line in self.stdout_lines:
            m = PROXY_RE.match(readiness_text(line))
            if m:
                return m.group(1)
        raise AssertionError(f"no proxy line in {self.stdout_lines}")

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 10.0)
        return httpx.Client(base_url=self.url, **kwargs)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig``, wait up to ``timeout``; SIGKILL if it does not exit.
        Returns the exit status (negative: killed by that signal)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        return self.proc.returncode

    def kill(self) -> int:
        """SIGKILL at once: no graceful shutdown, no flush."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)
        return self.proc.returncode


def start_serve(
    config: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stderr_path: Path | None = None,
    timeout: float = DEFAULT_START_TIMEOUT,
) -> ServeProcess:
    """Start ``triogate serve`` (``-c config`` unless None) and wait until it
    prints its admin URL. ``env`` adds to the cleaned environment."""
    args = [*triogate_command(), "serve"]
    if config is not None:
        args += ["-c", str(config)]
    if stderr_path is None:
        base = config.parent if config is not None else (cwd or Path.cwd())
        stderr_path = base / f"serve-stderr-{time.monotonic_ns()}.log"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=clean_env(env),
            cwd=cwd,
        )
    sp = ServeProcess(proc, stderr_path)
    sp.wait_ready(timeout)
    return sp


@contextmanager
def serving(config: Path | None, **kwargs: Any) -> Iterator[ServeProcess]:
    """``start_serve`` that never leaks the process: killed on the way out if
    the test did not stop it."""
    sp = start_serve(config, **kwargs)
    try:
        yield sp
    finally:
        if sp.running:
            sp.kill()


def wait_for_workers(proc: ServeProcess, workers: int = 2, timeout: float = 60.0) -> None:
    """Until every worker printed its readiness line (bounded). Each line is
    one write() below PIPE_BUF, so lines of several workers never interleave."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [readiness_text(line) for line in proc.stdout_lines]
        if sum("proxy listening" in line for line in lines) >= workers:
            return
        time.sleep(0.05)
    raise AssertionError(f"{workers} workers did not start: {proc.stdout_lines}")


def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*triogate_command(), *args],
        capture_output=True,
        text=True,
        env=clean_env(env),
        cwd=cwd,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct loopback ports free right now (for a child to listen on)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class _Ok(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        body = b"ok"
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def threaded_upstream(
    handler: type[http.server.BaseHTTPRequestHandler] = _Ok,
) -> Iterator[str]:
    """An upstream answering every GET with 200 "ok" (or as ``handler``
    does), served by threads (so a child process can load it while the test
    thread blocks); yields its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
