"""Checking a target and loading it: a request or two to verify it answers,
the key's usage through the admin API, wrk and its output."""

from __future__ import annotations

import http.client
import json
import math
import re
import ssl
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .bench_servers import BODY, USAGE_TIMEOUT, _affinity, _fail

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
    https = url.startswith("https://")
    rest = url.removeprefix("https://" if https else "http://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    conn: http.client.HTTPConnection
    if https:
        # The TLS target's certificate is the run's own self-signed one on
        # loopback (wrk does not verify either): checked for answers, not trust.
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(host, int(port), timeout=5, context=unverified)
    else:
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
