"""The gateway under soak (benchmarks/soak.py): its config, the real
``triogate serve`` subprocess on a real LMDB, and what /proc says about it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import trio

__all__ = ["SLOW_TIMEOUT", "ServerProcess", "SoakError", "config_text", "proc_stats"]

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
SLOW_TIMEOUT = 0.5  # the slow route's read timeout
_LISTENING = re.compile(r"^triogate: (proxy|admin) listening on http://([\d.]+):(\d+)", re.M)


class SoakError(Exception):
    """The soak cannot go on (the server would not start or died, setup failed)."""


def config_text(data_dir: Path, upstream_port: int, generation: int) -> str:
    """The served config; each generation changes a response header (the
    route is rebuilt) and the slow upstream's connect timeout (its pool is
    replaced and the old one closed)."""
    q = json.dumps  # a JSON string is a TOML basic string
    target = q(f"http://{HOST}:{upstream_port}")
    return f"""# triogate soak benchmark, generation {generation}
[server]
proxy_listen = "{HOST}:0"
admin_listen = "{HOST}:0"
data_dir = {q(str(data_dir))}
shutdown_grace_seconds = 2

[log]
access_log = "/dev/null"  # written (the path is exercised), not kept

[upstreams.main]
targets = [{target}]

[upstreams.slow]
targets = [{target}]
read_timeout_seconds = {SLOW_TIMEOUT}
connect_timeout_seconds = {2.0 + generation % 2}

[[routes]]
name = "ok"
path = "/ok/{{rest:path}}"
upstream = "main"
[routes.plugins]
key-auth = {{}}
response-transformer = {{ add_headers = {{ x-soak-generation = "{generation}" }} }}

[[routes]]
name = "error"
path = "/error/{{rest:path}}"
upstream = "main"
plugins = {{ key-auth = {{}} }}

[[routes]]
name = "slow"
path = "/slow/{{rest:path}}"
upstream = "slow"
plugins = {{ key-auth = {{}} }}
"""


def proc_stats(pid: int) -> tuple[float, float, int]:
    """RSS and RssAnon in MB, open file descriptors."""
    rss = anon = float("nan")
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("RssAnon:"):
                anon = int(line.split()[1]) / 1024
    return rss, anon, len(os.listdir(f"/proc/{pid}/fd"))


class ServerProcess:
    """``triogate serve -c tmp/triogate.toml`` with its data in ``tmp/data``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.data_dir = tmp / "data"
        self.conf = tmp / "triogate.toml"
        self.proc: subprocess.Popen[bytes] | None = None
        self.proxy_port = self.admin_port = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def write_config(self, upstream_port: int, generation: int) -> None:
        part = self.conf.with_suffix(".part")
        part.write_text(config_text(self.data_dir, upstream_port, generation))
        os.replace(part, self.conf)  # atomic: a reload never reads half a file

    def _spawn(self) -> subprocess.Popen[bytes]:
        # Without the caller's TRIOGATE_* variables: they would override the config.
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOGATE_")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.tmp / "serve.out", "wb") as out, open(self.tmp / "serve.err", "wb") as err:
            return subprocess.Popen(
                [sys.executable, "-m", "triogate", "serve", "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,  # a Ctrl-C reaches us; we stop it in order
            )

    async def start(self, upstream_port: int) -> None:
        """Start it and wait until it prints both listeners' addresses."""
        self.data_dir.mkdir()
        self.write_config(upstream_port, 0)
        proc = self.proc = self._spawn()
        out = self.tmp / "serve.out"
        with trio.move_on_after(START_TIMEOUT):
            while True:
                if proc.poll() is not None:
                    raise SoakError(f"triogate serve exited: {proc.returncode}\n{self.log()}")
                found = {m[0]: int(m[2]) for m in _LISTENING.findall(out.read_text())}
                if "proxy" in found and "admin" in found:
                    self.proxy_port, self.admin_port = found["proxy"], found["admin"]
                    return
                await trio.sleep(0.05)
        raise SoakError(f"triogate serve not ready within {START_TIMEOUT:.0f} s\n{self.log()}")

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise SoakError(f"triogate serve died (status {self.proc.returncode})\n{self.log()}")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.tmp / "serve.err").read_text(errors="replace")
        return ""

    def data_mb(self) -> float:
        """The size of LMDB's data file, wherever the store keeps it."""
        with contextlib.suppress(OSError):
            return sum(p.stat().st_size for p in self.data_dir.rglob("data.mdb")) / 2**20
        return float("nan")

    async def stop(self) -> int | None:
        """SIGTERM, then the exit status (None: it had to be killed)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await trio.to_thread.run_sync(proc.wait, STOP_TIMEOUT)
        if proc.poll() is None:
            self.kill()
            return None
        return proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT)
