"""The proxy benchmark's targets and its summary: the target names, issue
targets, medians over rounds, what a failed server printed, and the table
with its verdicts (``python -m benchmarks proxy``)."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

from . import proxy_report
from .bench_load import Target, UsageCheck, WrkResult
from .bench_servers import _EXCEPTION_LINE, _LOG_RECORD

TARGET_NOKEY = 0.35  # triogate without plugins vs nginx as a proxy
TARGET_KEY = 0.30  # triogate with key-auth vs nginx as a proxy
TARGET_LIMITED = 0.30  # triogate with key-auth + rate-limit + usage vs nginx as a proxy

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
