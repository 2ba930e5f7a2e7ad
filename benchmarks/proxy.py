"""End-to-end proxy throughput: wrk against nginx, nginx as a proxy, a bare
trio proxy, the Python gateways a team could write instead, and triogate.

Nine targets in one run, each loaded the same way (wrk, one thread, N
keep-alive connections, after a short warm-up):

  direct          wrk -> nginx serving a fixed 20-byte body (the upstream)
  nginx-proxy     wrk -> nginx as a reverse proxy (upstream keep-alive) -> upstream
  bare trio       wrk -> ``benchmarks/bare_proxy.py`` -> upstream: the smallest
                  honest reverse proxy on trio + httptools (no routing, no
                  plugins), the floor of what any gateway written on trio +
                  httptools can do on this machine; triogate's ratio to it
                  shows how much of its cost is the language and runtime and
                  how much is triogate's own
  aiohttp         wrk -> ``benchmarks/peers/aiohttp_proxy.py``: a hand-written
                  aiohttp + uvloop reverse proxy, ~40 lines (the peers run
                  from their own venv, benchmarks/.peers-venv)
  aiohttp+key     the same as a minimal DIY gateway: X-API-Key looked up in a
                  dict (401 without it) and a request counter per key
  starlette       ``benchmarks/peers/starlette_proxy.py``: Starlette + httpx on
                  uvicorn (uvloop, httptools), the usual FastAPI-style gateway
  triogate        wrk -> ``triogate serve``, a route without plugins -> upstream
  triogate+key    the same with ``key-auth`` on the route (X-API-Key header)
  triogate+limit  ``key-auth`` and ``rate-limit`` (by key) on the route, and a
                  key with its own rate limit and credits: every request is
                  admitted against three limits and the credits, and counted
                  in the key's usage, which the actors flush to storage. The
                  limits are so high that nothing is refused: the figure is
                  the cost of the checks, not of refusals. After the run the
                  key's usage (admin API) must have grown by at least the
                  requests wrk counted.

Targets are loaded in interleaved rounds (``--rounds N``: every target
once, then every target again, ...) so drift over the run hits all alike; the
figures are the median per target over its rounds. Progress goes to stderr.
``--report DIR`` writes results.json, results.md and a PNG bar chart (with
matplotlib from the peers' venv or ``triogate[bench]``).

Every server under test (both nginx instances, the bare proxy, the peers and
triogate) is pinned to one core and wrk to another, so the servers share one core the
way they would share a small machine, and the load generator does not steal
from them. Before loading a target the benchmark checks that it answers 200
with the expected body (and, for the rate-limited route, the RateLimit
headers); wrk's socket errors and non-2xx/3xx answers are reported, and a run
with any of them is flagged (exit status 1).

Needs nginx and wrk, and the peers' venv: ``bash benchmarks/setup.sh``
installs nginx and wrk from Debian's packages and the peers from PyPI into
benchmarks/.peers-venv (``--no-peers`` runs without them). Only loopback
traffic; every process started here is stopped on the way out, on errors and
Ctrl-C too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from . import proxy_report
from .machine import describe

BODY = b"triogate-bench-body\n"  # 20 bytes, what the upstream answers
assert len(BODY) == 20
HOST = "127.0.0.1"
REQUEST_PATH = "bench/item"  # after the route prefix; the upstream answers any path
START_TIMEOUT = 20.0  # seconds for a server to come up
STOP_TIMEOUT = 5.0  # seconds for a server to go after SIGTERM, then SIGKILL
TARGET_NOKEY = 0.35  # triogate without plugins vs nginx as a proxy
TARGET_KEY = 0.30  # triogate with key-auth vs nginx as a proxy
TARGET_LIMITED = 0.30  # triogate with key-auth + rate-limit + usage vs nginx as a proxy
NEVER = 1_000_000_000  # a rate limit (per second) that never refuses
CREDITS = 1_000_000_000_000  # credits that never run out
USAGE_TIMEOUT = 10.0  # seconds for the actors to flush a key's usage after the load
_LISTENING = re.compile(r"^triogate: proxy listening on (http://\S+)$", re.MULTILINE)
_ADMIN_LISTENING = re.compile(r"^triogate: admin listening on (http://\S+)$", re.MULTILINE)
_LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Group)\b.*")


DIRECT = "direct (nginx)"
NGINX_PROXY = "nginx as proxy"
BARE = "bare trio + httptools proxy (floor)"
AIOHTTP = "aiohttp + uvloop proxy (hand-written)"
AIOHTTP_KEY = "aiohttp + uvloop, API-key dict + counter"
STARLETTE = "Starlette + httpx on uvicorn"
PEER_KEY = "bench-peer-key-0123456789abcdef"  # the DIY gateway's one known key
NOKEY = "triogate, no plugins"
KEY = "triogate, key-auth"
LIMITED = "triogate, key-auth + rate-limit + usage"
FLOOR_PURPOSE = (
    f"floor: {BARE!r} (benchmarks/bare_proxy.py) is the floor of what\n"
    "  any gateway written on trio + httptools can do on this machine: the smallest honest\n"
    "  proxy (no routing, no plugins, one keep-alive upstream connection per client). A triogate\n"
    "  target's 'vs bare trio' ratio shows how much of its cost is the language and runtime\n"
    "  (what the floor pays too) and how much is triogate's own."
)


class BenchError(Exception):
    """Something the benchmark cannot go on without; the message says what."""


def _fail(message: str) -> NoReturn:
    raise BenchError(message)


# --- processes -------------------------------------------------------------


def _affinity(core: int | None) -> Callable[[], None] | None:
    """A preexec hook pinning the child (and whatever it forks) to one core."""
    if core is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, {core})

    return pin


def _cpus_allowed(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Cpus_allowed_list:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (nginx workers)."""
    total = 0.0
    for p in (pid, *_children(pid)):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@dataclass
class Managed:
    """A server process started here, in its own session (so a Ctrl-C on the
    terminal reaches us, not it, and we stop it in order)."""

    name: str
    proc: subprocess.Popen[bytes]
    logs: list[Path] = field(default_factory=list)

    def tail(self, lines: int = 30) -> str:
        out: list[str] = []
        for path in self.logs:
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").strip()
                if text:
                    out.append(f"--- {path.name} (last {lines} lines) ---")
                    out.extend(text.splitlines()[-lines:])
        return "\n".join(out)

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            _fail(f"{self.name} exited with status {code}\n{self.tail()}")

    def stop(self) -> None:
        proc = self.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT)
        # The session leader is this pid: take down anything it left behind
        # (an nginx worker whose master was killed, say).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT)


def _start(
    stack: contextlib.ExitStack,
    name: str,
    argv: Sequence[str],
    *,
    core: int | None,
    stdout: Path,
    stderr: Path,
    logs: Sequence[Path] = (),
    cwd: Path | None = None,
) -> Managed:
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            preexec_fn=_affinity(core),
            cwd=cwd,
        )
    managed = Managed(name, proc, [stdout, stderr, *logs])
    stack.callback(managed.stop)
    return managed


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _wait_port(server: Managed, port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        server.check_alive()
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    _fail(f"{server.name} did not listen on {HOST}:{port} within {START_TIMEOUT:.0f} s")


# --- nginx -----------------------------------------------------------------


def _nginx_conf(tmp: Path, name: str, port: int, locations: str, http_extra: str = "") -> Path:
    """One nginx instance: foreground master, one worker, everything in tmp."""
    temp = tmp / f"{name}-temp"
    temp.mkdir()
    user = "user root root;\n" if os.geteuid() == 0 else ""
    conf = tmp / f"{name}.conf"
    conf.write_text(
        f"""{user}daemon off;
master_process on;
worker_processes 1;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {temp}/client_body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    keepalive_timeout 75s;
    keepalive_requests 10000000;
{http_extra}
    server {{
        listen {HOST}:{port};
{locations}
    }}
}}
"""
    )
    return conf


def _write_upstream_conf(tmp: Path, port: int) -> Path:
    body = BODY.decode("ascii").replace("\n", "\\n")  # nginx reads \n in a quoted string
    locations = f"""        location / {{
            default_type text/plain;
            return 200 "{body}";
        }}"""
    return _nginx_conf(tmp, "upstream", port, locations)


def _write_proxy_conf(tmp: Path, port: int, upstream_port: int) -> Path:
    upstream = f"""    upstream bench_upstream {{
        server {HOST}:{upstream_port};
        keepalive 64;
        keepalive_requests 10000000;
    }}"""
    locations = """        location / {
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }"""
    return _nginx_conf(tmp, "proxy", port, locations, upstream)


def _start_nginx(
    stack: contextlib.ExitStack, nginx: str, tmp: Path, name: str, conf: Path, core: int | None
) -> Managed:
    error_log = tmp / f"{name}-error.log"
    argv = [nginx, "-p", str(tmp), "-c", str(conf), "-e", str(error_log)]
    check = subprocess.run(
        [*argv, "-t", "-q"], capture_output=True, text=True, timeout=30, check=False
    )
    if check.returncode != 0:
        _fail(f"nginx rejected {conf}:\n{check.stderr}")
    return _start(
        stack,
        f"nginx ({name})",
        argv,
        core=core,
        stdout=tmp / f"{name}.out",
        stderr=tmp / f"{name}.err",
        logs=[error_log],
    )


# --- triogate --------------------------------------------------------------


def _triogate_conf(tmp: Path, data_dir: Path, upstream_port: int) -> Path:
    conf = tmp / "triogate.toml"
    q = json.dumps  # a JSON string is a valid TOML basic string
    conf.write_text(
        f"""[server]
proxy_listen = "{HOST}:0"
admin_listen = "{HOST}:0"
data_dir = {q(str(data_dir))}
shutdown_grace_seconds = 1

[log]
access_log = ""  # as the nginx peers run: access_log off

[upstreams.nginx]
targets = ["http://{HOST}:{upstream_port}"]

[[routes]]
name = "nokey"
path = "/nokey/{{rest:path}}"
upstream = "nginx"

[[routes]]
name = "key"
path = "/key/{{rest:path}}"
upstream = "nginx"
plugins = {{ key-auth = {{}} }}

[[routes]]
name = "limited"
path = "/limited/{{rest:path}}"
upstream = "nginx"
plugins = {{ key-auth = {{}}, rate-limit = {{ limit = {NEVER}, period_seconds = 1, by = "key" }} }}
"""
    )
    return conf


def _triogate_cli(what: str, argv: Sequence[str]) -> dict[str, object]:
    """Run ``python -m triogate ARGV`` (which must print JSON) and return it."""
    done = subprocess.run(
        [sys.executable, "-m", "triogate", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        _fail(f"'triogate {what}' failed ({done.returncode}):\n{done.stderr}")
    try:
        printed = json.loads(done.stdout)
    except ValueError:
        printed = None
    if not isinstance(printed, dict):
        _fail(f"'triogate {what} --json' printed no JSON object:\n{done.stdout}")
    return printed


def _secret(what: str, printed: dict[str, object], field: str) -> str:
    value = printed.get(field)
    if not isinstance(value, str) or not value:
        _fail(f"'triogate {what} --json' printed no {field}:\n{printed}")
    return value


@dataclass(frozen=True)
class ApiKey:
    id: str
    key: str


def _create_key(data_dir: Path, name: str, options: Sequence[str] = ()) -> ApiKey:
    argv = ["keys", "create", "--data-dir", str(data_dir)]
    argv += ["--name", name, "--owner", "bench", *options, "--json"]
    printed = _triogate_cli("keys create", argv)
    return ApiKey(_secret("keys create", printed, "id"), _secret("keys create", printed, "key"))


def _create_admin(data_dir: Path) -> str:
    """An admin (super_admin) for the admin API; its key."""
    argv = ["admin", "create", "--name", "b", "--email", "b@example.com"]
    argv += ["--data-dir", str(data_dir), "--json"]
    return _secret("admin create", _triogate_cli("admin create", argv), "key")


def _start_triogate(
    stack: contextlib.ExitStack, tmp: Path, conf: Path, core: int | None
) -> tuple[Managed, str, str]:
    """The server, its proxy URL and its admin URL (both printed by serve)."""
    stdout = tmp / "triogate.out"
    server = _start(
        stack,
        "triogate",
        [sys.executable, "-m", "triogate", "serve", "-c", str(conf)],
        core=core,
        stdout=stdout,
        stderr=tmp / "triogate.err",
    )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        server.check_alive()
        printed = stdout.read_text(errors="replace")
        proxy, admin = _LISTENING.search(printed), _ADMIN_LISTENING.search(printed)
        if proxy and admin:
            return server, proxy.group(1), admin.group(1)
        time.sleep(0.05)
    _fail(f"triogate did not report its proxy and admin addresses within {START_TIMEOUT:.0f} s")


# --- the bare trio proxy (the floor) --------------------------------------------


def _start_bare(
    stack: contextlib.ExitStack, tmp: Path, port: int, upstream_port: int, core: int | None
) -> Managed:
    # This package under the name it was imported by: ``benchmarks`` from
    # the repository root (python -m benchmarks), ``triogate.benchmarks``
    # when installed (triogate bench); the former needs the root as cwd.
    module = f"{__package__}.bare_proxy"
    root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, "-m", module]
    argv += ["--listen", f"{HOST}:{port}", "--upstream", f"{HOST}:{upstream_port}"]
    return _start(
        stack,
        "bare trio proxy",
        argv,
        core=core,
        stdout=tmp / "bare.out",
        stderr=tmp / "bare.err",
        cwd=root if __package__ == "benchmarks" else None,
    )


# --- the peers: what a Python team could write instead --------------------------


def _start_peer(
    stack: contextlib.ExitStack,
    tmp: Path,
    name: str,
    script: str,
    port: int,
    upstream_port: int,
    core: int | None,
    extra: Sequence[str] = (),
) -> Managed:
    """A peer script run by the peers' venv (never the product's)."""
    argv = [str(proxy_report.PEERS_PYTHON), str(proxy_report.PEERS / script)]
    argv += ["--listen", f"{HOST}:{port}", "--upstream", f"{HOST}:{upstream_port}", *extra]
    slug = script.removesuffix(".py") + ("-key" if extra else "")
    return _start(
        stack, name, argv, core=core, stdout=tmp / f"{slug}.out", stderr=tmp / f"{slug}.err"
    )


# --- checking and loading ----------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    headers: tuple[tuple[str, str], ...] = ()
    # Response headers the answer must carry: (name, a substring of the value).
    expect: tuple[tuple[str, str], ...] = ()


def _request(
    url: str, headers: Sequence[tuple[str, str]]
) -> tuple[int, http.client.HTTPMessage, bytes]:
    rest = url.removeprefix("http://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/" + path, headers=dict(headers))
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def _get(url: str, headers: Sequence[tuple[str, str]]) -> tuple[int, bytes]:
    status, _, body = _request(url, headers)
    return status, body


def _verify(target: Target) -> dict[str, str]:
    """The target must answer 200 with the upstream's exact body and the
    expected headers; returns those headers as answered."""
    try:
        status, headers, body = _request(target.url, target.headers)
    except OSError as exc:
        _fail(f"{target.name}: GET {target.url} failed: {exc}")
    if status != 200 or body != BODY:
        _fail(
            f"{target.name}: GET {target.url} answered {status} with {body[:200]!r}; "
            f"expected 200 with {BODY!r}"
        )
    seen: dict[str, str] = {}
    for name, part in target.expect:
        value = headers.get(name)
        if value is None or part not in value:
            wanted = f"a {name} header containing {part!r}" if part else f"a {name} header"
            _fail(
                f"{target.name}: GET {target.url} answered without {wanted}; "
                f"headers: {dict(headers.items())}"
            )
        seen[name] = value
    return seen


@dataclass(frozen=True)
class Usage:
    requests: int
    credits_remaining: int | None


def _usage(admin_url: str, admin_key: str, key_id: str) -> Usage:
    """A key's usage as the admin API reports it (what the actors flushed)."""
    url = f"{admin_url}/keys/{key_id}/usage"
    try:
        status, _, body = _request(url, (("Authorization", f"Bearer {admin_key}"),))
    except OSError as exc:
        _fail(f"GET {url} failed: {exc}")
    if status != 200:
        _fail(f"GET {url} answered {status}: {body[:300]!r}")
    try:
        usage = json.loads(body)
        requests, credits = usage["requests"], usage["credits_remaining"]
    except (ValueError, KeyError, TypeError):
        _fail(f"GET {url} answered no usage: {body[:300]!r}")
    if not isinstance(requests, int) or not (credits is None or isinstance(credits, int)):
        _fail(f"GET {url} answered an unexpected usage: {body[:300]!r}")
    return Usage(requests, credits)


@dataclass(frozen=True)
class UsageCheck:
    """The rate-limited key's usage around its load (warm-up included)."""

    key_id: str
    before: Usage
    after: Usage
    answered: int  # requests wrk counted as answered, warm-up and measured
    policy: str  # the RateLimit-Policy header the route answered with
    waited: float  # seconds until the flushed usage covered the load

    @property
    def ok(self) -> bool:
        credits_ok = (
            self.before.credits_remaining is not None
            and self.after.credits_remaining is not None
            and self.before.credits_remaining - self.after.credits_remaining >= self.answered
        )
        return self.after.requests - self.before.requests >= self.answered and credits_ok

    def describe(self) -> str:
        grew = self.after.requests - self.before.requests
        spent = (
            self.before.credits_remaining - self.after.credits_remaining
            if self.before.credits_remaining is not None
            and self.after.credits_remaining is not None
            else None
        )
        verdict = "ok" if self.ok else "WRONG: expected both to grow by at least that"
        return (
            f"usage of {self.key_id} (admin API, as flushed by the actors): requests "
            f"{self.before.requests:,} -> {self.after.requests:,} (+{grew:,}), credits spent "
            f"{'?' if spent is None else f'{spent:,}'}; wrk counted {self.answered:,} answered "
            f"(warm-up included); flushed within {self.waited:.1f} s: {verdict}"
        )


def _await_usage(
    admin_url: str, admin_key: str, key_id: str, before: Usage, answered: int
) -> tuple[Usage, float]:
    """Poll the key's usage until it covers ``answered`` more requests (the
    actors flush every storage.flush_interval_seconds) or time runs out."""
    start = time.monotonic()
    while True:
        after = _usage(admin_url, admin_key, key_id)
        waited = time.monotonic() - start
        if after.requests - before.requests >= answered or waited >= USAGE_TIMEOUT:
            return after, waited
        time.sleep(0.2)


@dataclass
class WrkResult:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx_3xx: int
    socket_errors: dict[str, int]
    output: str
    cpu_us_per_request: float = math.nan

    @property
    def errors(self) -> int:
        return self.non_2xx_3xx + sum(self.socket_errors.values())


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _duration_ms(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text)
    if match is None:
        _fail(f"cannot read wrk's duration {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str, *, latency: bool = True) -> WrkResult:
    """wrk's summary; p50/p99 need ``--latency`` (NaN without it)."""
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", output, re.MULTILINE)
    p50 = re.search(r"^\s+50(?:\.000)?%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99(?:\.000)?%\s+(\S+)", output, re.MULTILINE)
    total = re.search(r"^\s+(\d+) requests in", output, re.MULTILINE)
    if rps is None or total is None or (latency and (p50 is None or p99 is None)):
        _fail(f"cannot read wrk's output:\n{output}")
    non2xx = re.search(r"^\s+Non-2xx or 3xx responses:\s+(\d+)", output, re.MULTILINE)
    sock = re.search(
        r"^\s+Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
        output,
        re.MULTILINE,
    )
    socket_errors = {}
    if sock is not None:
        names = ("connect", "read", "write", "timeout")
        socket_errors = {n: int(v) for n, v in zip(names, sock.groups(), strict=True) if int(v)}
    return WrkResult(
        requests_per_second=float(rps.group(1)),
        p50_ms=_duration_ms(p50.group(1)) if p50 else math.nan,
        p99_ms=_duration_ms(p99.group(1)) if p99 else math.nan,
        requests=int(total.group(1)),
        non_2xx_3xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=socket_errors,
        output=output,
    )


def _wrk(
    wrk: str,
    target: Target,
    *,
    seconds: int,
    connections: int,
    core: int | None,
    latency: bool,
) -> str:
    argv = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s"]
    if latency:
        argv.append("--latency")
    for name, value in target.headers:
        argv += ["-H", f"{name}: {value}"]
    argv.append(target.url)
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            check=False,
            preexec_fn=_affinity(core),
        )
    except subprocess.TimeoutExpired:
        _fail(f"wrk against {target.name} did not finish within {seconds + 30} s")
    if done.returncode != 0:
        _fail(f"wrk against {target.name} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


# --- the run -------------------------------------------------------------------


def _find(program: str) -> str:
    found = shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin")
    if found is None:
        _fail(f"{program} not found: run 'bash benchmarks/setup.sh' first (as root)")
    return found


def _core(value: int, role: str) -> int | None:
    if value < 0:
        return None
    allowed = os.sched_getaffinity(0)
    if value not in allowed:
        _fail(f"--{role}-core {value}: this process may only use cores {sorted(allowed)}")
    return value


def _pinning(server_core: int | None, load_core: int | None) -> str:
    servers = "not pinned" if server_core is None else f"pinned to core {server_core}"
    load = "not pinned" if load_core is None else f"pinned to core {load_core}"
    shared = " (SAME core as the servers)" if server_core == load_core is not None else ""
    return (
        f"servers (nginx upstream, nginx proxy, bare trio proxy, peers, triogate) {servers}; "
        f"wrk {load}{shared}"
    )


def _tree_affinity(server: Managed) -> str:
    pids = [server.proc.pid, *_children(server.proc.pid)]
    return ",".join(sorted({_cpus_allowed(pid) for pid in pids}))


def _round_of(result: WrkResult) -> proxy_report.Round:
    return proxy_report.Round(
        requests_per_second=result.requests_per_second,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        cpu_us_per_request=result.cpu_us_per_request,
        requests=result.requests,
        non_2xx_3xx=result.non_2xx_3xx,
        socket_errors=dict(result.socket_errors),
    )


def _progress(round_no: int, rounds: int, index: int, total: int, name: str, left: float) -> None:
    minutes, seconds = divmod(max(0, round(left)), 60)
    print(
        f"[round {round_no}/{rounds}] target {index}/{total}: {name} "
        f"(about {minutes}:{seconds:02d} left)",
        file=sys.stderr,
        flush=True,
    )


def run(args: argparse.Namespace) -> int:
    nginx = _find("nginx")
    wrk = _find("wrk")
    peers = not args.no_peers
    if peers and not proxy_report.PEERS_PYTHON.exists():
        _fail(
            f"the peers' venv {proxy_report.PEERS_PYTHON.parent.parent} is missing: run "
            "'bash benchmarks/setup.sh' first (or pass --no-peers)"
        )
    server_core = _core(args.server_core, "server")
    load_core = _core(args.load_core, "load")

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="triogate-bench-")))
        upstream_port = _free_port()
        proxy_port = _free_port()
        while proxy_port == upstream_port:
            proxy_port = _free_port()
        bare_port = _free_port()
        while bare_port in (upstream_port, proxy_port):
            bare_port = _free_port()

        upstream = _start_nginx(
            stack, nginx, tmp, "upstream", _write_upstream_conf(tmp, upstream_port), server_core
        )
        proxy = _start_nginx(
            stack,
            nginx,
            tmp,
            "proxy",
            _write_proxy_conf(tmp, proxy_port, upstream_port),
            server_core,
        )
        bare = _start_bare(stack, tmp, bare_port, upstream_port, server_core)
        peer_servers: list[tuple[Managed, int, Target]] = []
        if peers:
            for name, script, extra, path, headers in (
                (AIOHTTP, "aiohttp_proxy.py", (), "nokey", ()),
                (
                    AIOHTTP_KEY,
                    "aiohttp_proxy.py",
                    ("--api-key", PEER_KEY),
                    "key",
                    (("X-API-Key", PEER_KEY),),
                ),
                (STARLETTE, "starlette_proxy.py", (), "nokey", ()),
            ):
                port = _free_port()
                server = _start_peer(
                    stack, tmp, name, script, port, upstream_port, server_core, extra
                )
                target = Target(name, f"http://{HOST}:{port}/{path}/{REQUEST_PATH}", headers)
                peer_servers.append((server, port, target))
        data_dir = tmp / "data"
        data_dir.mkdir()
        key = _create_key(data_dir, "bench")
        # Its own limit and credits: checked on every request, usage counted.
        limited_key = _create_key(
            data_dir,
            "bench-limited",
            ["--rate-limit", f"burst={NEVER}/1", "--credits", str(CREDITS)],
        )
        admin_key = _create_admin(data_dir)
        gateway, gateway_url, admin_url = _start_triogate(
            stack, tmp, _triogate_conf(tmp, data_dir, upstream_port), server_core
        )
        _wait_port(upstream, upstream_port)
        _wait_port(proxy, proxy_port)
        _wait_port(bare, bare_port)
        for server, port, _ in peer_servers:
            _wait_port(server, port)

        targets = [
            Target(DIRECT, f"http://{HOST}:{upstream_port}/nokey/{REQUEST_PATH}"),
            Target(NGINX_PROXY, f"http://{HOST}:{proxy_port}/nokey/{REQUEST_PATH}"),
            Target(BARE, f"http://{HOST}:{bare_port}/nokey/{REQUEST_PATH}"),
            *(target for _, _, target in peer_servers),
            Target(NOKEY, f"{gateway_url}/nokey/{REQUEST_PATH}"),
            Target(KEY, f"{gateway_url}/key/{REQUEST_PATH}", (("X-API-Key", key.key),)),
            Target(
                LIMITED,
                f"{gateway_url}/limited/{REQUEST_PATH}",
                (("X-API-Key", limited_key.key),),
                # Both policies, the key's own and the route's, and the state.
                (
                    ("RateLimit-Policy", '"burst"'),
                    ("RateLimit-Policy", '"route-key"'),
                    ("RateLimit", ""),
                ),
            ),
        ]
        by_name = {t.name: t for t in targets}
        policy = ""
        for target in targets:
            policy = _verify(target).get("RateLimit-Policy", policy)
        # And key-auth is really on: no key, no entry.
        for name in (KEY, LIMITED, AIOHTTP_KEY) if peers else (KEY, LIMITED):
            status, _ = _get(by_name[name].url, ())
            if status != 401:
                _fail(f"{name!r} answered {status} without a key; expected 401")

        servers = (upstream, proxy, bare, *(s for s, _, _ in peer_servers), gateway)
        # CPU spent per request by the process answering wrk (not the
        # upstream): steady under load from other programs, where req/s
        # is not.
        answering = {
            DIRECT: upstream,
            NGINX_PROXY: proxy,
            BARE: bare,
            **{target.name: server for server, _, target in peer_servers},
            NOKEY: gateway,
            KEY: gateway,
            LIMITED: gateway,
        }
        placement = "; ".join(f"{s.name}: cpus {_tree_affinity(s)}" for s in servers)

        print("benchmark: end-to-end HTTP/1.1 proxy, 20-byte body from an nginx upstream")
        print(describe(_pinning(server_core, load_core)))
        print(f"processes: {placement}")
        print(
            f"load: wrk -t1 -c{args.connections} -d{args.seconds}s --latency "
            f"(after a {args.warmup} s warm-up), one target at a time, all on loopback"
        )
        print(f"  ({nginx} {_version([nginx, '-v'])}; {_version([wrk, '-v'])})")
        print(
            f"{LIMITED!r}: route rate-limit {NEVER:,}/1 s by key, key limit burst={NEVER:,}/1 s, "
            f"{CREDITS:,} credits (nothing is refused: the checks are measured)"
        )
        print(FLOOR_PURPOSE)
        print(
            f"rounds: {args.rounds}, interleaved (every target once per round); "
            "figures are the median per target over its rounds"
        )
        print()

        load_before = os.getloadavg()[0]
        rounds: dict[str, list[WrkResult]] = {t.name: [] for t in targets}
        warm_rounds: dict[str, list[WrkResult]] = {t.name: [] for t in targets}
        usage_before = None
        answered = 0  # the rate-limited key's requests, warm-ups included
        order = proxy_report.interleave([t.name for t in targets], args.rounds)
        per_load = args.warmup + args.seconds + 0.5  # wrk's start-up and the checks
        for done, (round_no, name) in enumerate(order):
            target = by_name[name]
            _progress(
                round_no,
                args.rounds,
                targets.index(target) + 1,
                len(targets),
                name,
                (len(order) - done) * per_load,
            )
            for server in servers:
                server.check_alive()
            if target.name == LIMITED and usage_before is None:
                usage_before = _usage(admin_url, admin_key, limited_key.id)
            if args.warmup > 0:
                output = _wrk(
                    wrk,
                    target,
                    seconds=args.warmup,
                    connections=args.connections,
                    core=load_core,
                    latency=False,
                )
                warm = parse_wrk(output, latency=False)
                warm_rounds[name].append(warm)
                if name == LIMITED:
                    answered += warm.requests
            cpu_before = _cpu_seconds(answering[target.name].proc.pid)
            measured = parse_wrk(
                _wrk(
                    wrk,
                    target,
                    seconds=args.seconds,
                    connections=args.connections,
                    core=load_core,
                    latency=True,
                )
            )
            cpu = _cpu_seconds(answering[target.name].proc.pid) - cpu_before
            if measured.requests:
                measured = dataclasses.replace(
                    measured, cpu_us_per_request=cpu / measured.requests * 1e6
                )
            rounds[name].append(measured)
            if name == LIMITED:
                answered += measured.requests
            for server in servers:
                server.check_alive()
            _verify(target)  # still healthy after the load
        print("all rounds done", file=sys.stderr, flush=True)
        rows = [
            proxy_report.median_row(
                t.name,
                [_round_of(r) for r in rounds[t.name]],
                [_round_of(r) for r in warm_rounds[t.name]],
            )
            for t in targets
        ]
        results = {row.target: _median_result(row) for row in rows}
        warmups = {name: _merged(found) for name, found in warm_rounds.items() if found}
        assert usage_before is not None
        usage_after, waited = _await_usage(
            admin_url, admin_key, limited_key.id, usage_before, answered
        )
        usage = UsageCheck(limited_key.id, usage_before, usage_after, answered, policy, waited)
        triogate_log = _problems(tmp / "triogate.err")
        bare_log = _stderr_text(tmp / "bare.err")
        load_after = os.getloadavg()[0]

    code = _report(targets, results, warmups, triogate_log, bare_log, usage)
    load_text = f"1-min load average {load_before:.2f} before, {load_after:.2f} after"
    print(f"machine {load_text}; anything else running on the servers' core skews these figures")
    if args.report is not None:
        meta: dict[str, object] = {
            "command": "python -m benchmarks proxy " + " ".join(args.argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": describe(_pinning(server_core, load_core)).removeprefix("machine: "),
            "load": load_text,
            "rounds": args.rounds,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "connections": args.connections,
            "flagged": code != 0,
        }
        for line in proxy_report.write_report(Path(args.report), rows, meta):
            print(f"report: {line}")
    return code


def _median_result(row: proxy_report.Row) -> WrkResult:
    """A target's median figures as a WrkResult, its errors summed over the
    measured rounds (warm-ups are reported apart)."""
    measured = row.rounds
    sockets: dict[str, int] = {}
    for r in measured:
        for kind, n in r.socket_errors.items():
            sockets[kind] = sockets.get(kind, 0) + n
    return WrkResult(
        requests_per_second=row.requests_per_second,
        p50_ms=row.p50_ms,
        p99_ms=row.p99_ms,
        requests=row.requests,
        non_2xx_3xx=sum(r.non_2xx_3xx for r in measured),
        socket_errors=sockets,
        output="",
        cpu_us_per_request=row.cpu_us_per_request,
    )


def _merged(found: list[WrkResult]) -> WrkResult:
    """Warm-ups of one target over the rounds, requests and errors summed."""
    sockets: dict[str, int] = {}
    for r in found:
        for kind, n in r.socket_errors.items():
            sockets[kind] = sockets.get(kind, 0) + n
    return WrkResult(
        requests_per_second=math.nan,
        p50_ms=math.nan,
        p99_ms=math.nan,
        requests=sum(r.requests for r in found),
        non_2xx_3xx=sum(r.non_2xx_3xx for r in found),
        socket_errors=sockets,
        output="",
    )


def _stderr_text(path: Path, tail: int = 25) -> str:
    """The last lines a process wrote to stderr (the bare proxy writes none
    unless something went wrong)."""
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-tail:])


def _problems(path: Path, tail: int = 25) -> str:
    """What triogate logged above INFO: counts, the distinct exceptions, and
    the last traceback."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    records = [line for line in lines if _LOG_RECORD.match(line)]
    bad = [line for line in records if " INFO " not in line and " DEBUG " not in line]
    if not bad and not any(line.startswith("Traceback") for line in lines):
        return ""
    levels: dict[str, int] = {}
    for line in bad:
        level = line.split()[2]
        levels[level] = levels.get(level, 0) + 1
    out = [", ".join(f"{n} {level} records" for level, n in levels.items()) or "no records"]
    exceptions: dict[str, int] = {}
    for line in lines:
        if _EXCEPTION_LINE.match(line):
            exceptions[line] = exceptions.get(line, 0) + 1
    out += [f"  {n} x {exc}" for exc, n in sorted(exceptions.items(), key=lambda kv: -kv[1])]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    if starts:
        last = lines[starts[-1] - 1 if starts[-1] else 0 :]
        out.append("the last one:")
        out += last[:tail] + ([f"... ({len(last) - tail} more lines)"] if len(last) > tail else [])
    return "\n".join(out)


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout + done.stderr).strip().splitlines()
    if not text:
        return "?"
    first = text[0]
    first = first.split("Copyright")[0].strip()
    return first.removeprefix("nginx version: ")


def _error_text(result: WrkResult) -> str:
    parts = []
    if result.non_2xx_3xx:
        parts.append(f"{result.non_2xx_3xx} non-2xx/3xx")
    parts += [f"{n} {kind}" for kind, n in result.socket_errors.items()]
    return ", ".join(parts) + f" of {result.requests}"


def _report(
    targets: list[Target],
    results: dict[str, WrkResult],
    warmups: dict[str, WrkResult],
    triogate_log: str,
    bare_log: str,
    usage: UsageCheck,
) -> int:
    baseline = results[NGINX_PROXY].requests_per_second
    floor = results[BARE].requests_per_second

    def ratio(name: str, base: float) -> float:
        return results[name].requests_per_second / base if base else 0.0

    width = max(len(t.name) for t in targets)
    header = (
        f"{'target':<{width}} {'req/s':>10} {'p50':>10} {'p99':>10} {'vs nginx proxy':>15} "
        f"{'vs bare trio':>13} {'CPU/req':>9}  errors"
    )
    print(header)
    print("-" * len(header))
    flagged = False
    for target in targets:
        r = results[target.name]
        errors = "none"
        if r.errors:
            flagged = True
            errors = "ERRORS: " + _error_text(r)
        warm = warmups.get(target.name)
        if warm is not None and warm.errors:
            flagged = True
            errors = ("" if errors == "none" else errors + "; ") + (
                "WARM-UP ERRORS: " + _error_text(warm)
            )
        print(
            f"{target.name:<{width}} {r.requests_per_second:>10,.0f} {r.p50_ms:>7.3f} ms "
            f"{r.p99_ms:>7.3f} ms {ratio(target.name, baseline):>14.2f}x "
            f"{ratio(target.name, floor):>12.2f}x {r.cpu_us_per_request:>6.0f} µs  {errors}"
        )
    print()
    checks = ((NOKEY, TARGET_NOKEY), (KEY, TARGET_KEY), (LIMITED, TARGET_LIMITED))
    for name, target_ratio in checks:
        vs_nginx = ratio(name, baseline)
        verdict = "meets" if vs_nginx >= target_ratio else "BELOW"
        print(
            f"target: {name} >= {target_ratio:.2f} x nginx as proxy req/s: {vs_nginx:.2f} x, "
            f"{verdict} ({ratio(name, floor):.2f} x the bare trio floor)"
        )
    if AIOHTTP_KEY in results:
        vs_diy = ratio(LIMITED, results[AIOHTTP_KEY].requests_per_second)
        verdict = "meets" if vs_diy >= 1.5 else "BELOW"
        print(
            f"target (issue 11): {LIMITED} >= 1.50 x {AIOHTTP_KEY!r} req/s: "
            f"{vs_diy:.2f} x, {verdict}"
        )
    print()
    print(f"{LIMITED}: answered with RateLimit-Policy: {usage.policy}")
    print(usage.describe())
    if not usage.ok:
        flagged = True
    if triogate_log:
        flagged = True
        print()
        print("triogate logged problems during the run (warm-ups included):")
        print(triogate_log)
    if bare_log:
        flagged = True
        print()
        print("the bare trio proxy wrote to stderr during the run (warm-ups included):")
        print(bare_log)
    if flagged:
        print()
        print("FLAGGED: errors during the run (see above); these figures are not a valid")
        print("measurement of a healthy gateway.")
    return 1 if flagged else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks proxy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=int, default=10, help="measured seconds per target")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds per target")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument(
        "--server-core", type=int, default=0, help="core for every server under test (-1: none)"
    )
    parser.add_argument("--load-core", type=int, default=1, help="core for wrk (-1: none)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="interleaved rounds; the median per target"
    )
    parser.add_argument(
        "--report", metavar="DIR", help="write results.json, results.md and proxy.png there"
    )
    parser.add_argument(
        "--no-peers", action="store_true", help="without the aiohttp and Starlette peers"
    )
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.seconds < 1 or args.warmup < 0 or args.connections < 1 or args.rounds < 1:
        parser.error("--seconds, --connections and --rounds must be >= 1, --warmup >= 0")

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    # SIGTERM unwinds like Ctrl-C does, so every server is stopped.
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return run(args)
    except BenchError as exc:
        print(f"benchmarks proxy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("benchmarks proxy: interrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
