"""The servers the proxy benchmarks start and stop: pinned processes, the
nginx upstream and proxy, ``triogate serve`` with its keys, the bare trio
floor and the Python peers. Shared by ``proxy``, ``profile``,
``instructions`` and ``scaling``; every process started here is stopped by
its ``ExitStack``."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from . import proxy_report

BODY = b"triogate-bench-body\n"  # 20 bytes, what the upstream answers
assert len(BODY) == 20
HOST = "127.0.0.1"
REQUEST_PATH = "bench/item"  # after the route prefix; the upstream answers any path
START_TIMEOUT = 20.0  # seconds for a server to come up
STOP_TIMEOUT = 5.0  # seconds for a server to go after SIGTERM, then SIGKILL
NEVER = 1_000_000_000  # a rate limit (per second) that never refuses
CREDITS = 1_000_000_000_000  # credits that never run out
USAGE_TIMEOUT = 10.0  # seconds for the actors to flush a key's usage after the load
_LISTENING = re.compile(r"^triogate: proxy listening on (https?://\S+)$", re.MULTILINE)
_ADMIN_LISTENING = re.compile(r"^triogate: admin listening on (http://\S+)$", re.MULTILINE)
_LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Group)\b.*")


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


def bench_certificate(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (P-256, a day long) and its
    key, for the TLS target: (cert file, key file)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "triogate bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp / "bench-cert.pem", tmp / "bench-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def _triogate_conf(
    tmp: Path,
    data_dir: Path,
    upstream_port: int,
    *,
    tls: tuple[Path, Path] | None = None,
    name: str = "triogate",
) -> Path:
    """The benchmark's config; with ``tls`` (cert, key) the listener is HTTPS."""
    conf = tmp / f"{name}.toml"
    q = json.dumps  # a JSON string is a valid TOML basic string
    tls_table = (
        ""
        if tls is None
        else f"\n[server.tls]\ncert_file = {q(str(tls[0]))}\nkey_file = {q(str(tls[1]))}\n"
    )
    conf.write_text(
        f"""[server]
proxy_listen = "{HOST}:0"
admin_listen = "{HOST}:0"
data_dir = {q(str(data_dir))}
shutdown_grace_seconds = 1
{tls_table}
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


@dataclass(frozen=True)
class BenchKeys:
    """The benchmark's two keys: a plain one (the ``key`` route) and one with
    its own never-refusing limit and never-ending credits (``limited``)."""

    key: ApiKey
    limited: ApiKey

    def headers(self, route: str) -> tuple[tuple[str, str], ...]:
        """The ``X-API-Key`` header for the proxy benchmark's ``route``."""
        secret = {"limited": self.limited.key, "key": self.key.key}.get(route)
        return (("X-API-Key", secret),) if secret else ()


def create_bench_keys(data_dir: Path) -> BenchKeys:
    return BenchKeys(
        _create_key(data_dir, "bench"),
        # Its own limit and credits: checked on every request, usage counted.
        _create_key(
            data_dir,
            "bench-limited",
            ["--rate-limit", f"burst={NEVER}/1", "--credits", str(CREDITS)],
        ),
    )


def _create_admin(data_dir: Path) -> str:
    """An admin (super_admin) for the admin API; its key."""
    argv = ["admin", "create", "--name", "b", "--email", "b@example.com"]
    argv += ["--data-dir", str(data_dir), "--json"]
    return _secret("admin create", _triogate_cli("admin create", argv), "key")


def _start_triogate(
    stack: contextlib.ExitStack, tmp: Path, conf: Path, core: int | None, name: str = "triogate"
) -> tuple[Managed, str, str]:
    """The server, its proxy URL and its admin URL (both printed by serve);
    its output in ``tmp/NAME.out`` and ``tmp/NAME.err``."""
    stdout = tmp / f"{name}.out"
    server = _start(
        stack,
        name,
        [sys.executable, "-m", "triogate", "serve", "-c", str(conf)],
        core=core,
        stdout=stdout,
        stderr=tmp / f"{name}.err",
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
