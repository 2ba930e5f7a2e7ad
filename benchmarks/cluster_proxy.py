"""Cluster limits end to end: the added CPU per proxied request and the
added latency of ``[cluster] redis_url``, next to the single node, in the
same run (``python -m benchmarks cluster``'s second part).

Two real ``triogate serve`` processes, one after the other, each with its
own data directory and the benchmark's keys (``create_bench_keys``), proxy
the benchmark's ``limited`` route (key-auth; the key's own limit and
credits; the route's ``rate-limit`` by key; usage counted and flushed) to
the nginx upstream under the same wrk load: once a single node, once a
cluster node deciding in a ``redis-server`` started here. Per mode: req/s,
p50 and p99 (wrk), the gateway's CPU per request (``/proc``, user + system)
and Redis's.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .bench_load import Target, WrkResult, _verify, _wrk, parse_wrk
from .bench_servers import (
    HOST,
    REQUEST_PATH,
    Managed,
    _cpu_seconds,
    _fail,
    _free_port,
    _start,
    _start_nginx,
    _start_triogate,
    _triogate_conf,
    _wait_port,
    _write_upstream_conf,
    create_bench_keys,
)

__all__ = ["Mode", "proxied"]

WARMUP_SECONDS = 1


@dataclass(frozen=True)
class Mode:
    name: str
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    gateway_cpu_us: float
    redis_cpu_us: float


def _find(program: str) -> str:
    found = shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin")
    if found is None:
        _fail(f"{program} not found: run 'bash benchmarks/setup.sh' first (as root)")
    return found


def _start_redis(stack: contextlib.ExitStack, tmp: Path) -> tuple[Managed, str]:
    port = _free_port()
    argv = [_find("redis-server"), "--port", str(port), "--bind", HOST, "--dir", str(tmp)]
    argv += ["--save", "", "--appendonly", "no"]
    redis = _start(
        stack, "redis-server", argv, core=None, stdout=tmp / "redis.out", stderr=tmp / "redis.err"
    )
    _wait_port(redis, port)
    return redis, f"redis://{HOST}:{port}/0"


def _measure(
    stack: contextlib.ExitStack,
    tmp: Path,
    name: str,
    upstream_port: int,
    redis: Managed,
    redis_url: str | None,
    *,
    seconds: int,
    connections: int,
) -> Mode:
    wrk = _find("wrk")
    work = tmp / name
    data_dir = work / "data"
    data_dir.mkdir(parents=True)
    keys = create_bench_keys(data_dir)
    conf = _triogate_conf(work, data_dir, upstream_port)
    if redis_url is not None:
        # The first node of an empty Redis: it uploads its records (the keys).
        conf.write_text(conf.read_text() + f'\n[cluster]\nredis_url = "{redis_url}"\n')
    gateway, proxy_url, _ = _start_triogate(stack, work, conf, None)
    target = Target(name, f"{proxy_url}/limited/{REQUEST_PATH}", keys.headers("limited"))
    _verify(target)
    _wrk(wrk, target, seconds=WARMUP_SECONDS, connections=connections, core=None, latency=False)
    cpu, redis_cpu = _cpu_seconds(gateway.proc.pid), _cpu_seconds(redis.proc.pid)
    result: WrkResult = parse_wrk(
        _wrk(wrk, target, seconds=seconds, connections=connections, core=None, latency=True)
    )
    cpu, redis_cpu = _cpu_seconds(gateway.proc.pid) - cpu, _cpu_seconds(redis.proc.pid) - redis_cpu
    gateway.check_alive()
    if result.errors or not result.requests:
        _fail(f"{name}: {result.errors} errors in {result.requests} requests:\n{result.output}")
    _verify(target)  # still right after the load
    gateway.stop()
    return Mode(
        name,
        result.requests_per_second,
        result.p50_ms,
        result.p99_ms,
        result.requests,
        cpu / result.requests * 1e6,
        redis_cpu / result.requests * 1e6,
    )


def proxied(seconds: float, connections: int, report: str | None = None) -> list[Mode]:
    """Both modes measured and printed (and written to ``report`` as JSON)."""
    wrk_seconds = max(1, round(seconds))
    nginx = _find("nginx")
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="triogate-cluster-")))
        upstream_port = _free_port()
        upstream = _start_nginx(
            stack, nginx, tmp, "upstream", _write_upstream_conf(tmp, upstream_port), None
        )
        _wait_port(upstream, upstream_port)
        redis, redis_url = _start_redis(stack, tmp)
        modes = [
            _measure(
                stack,
                tmp,
                name,
                upstream_port,
                redis,
                url,
                seconds=wrk_seconds,
                connections=connections,
            )
            for name, url in (("single node", None), ("cluster node", redis_url))
        ]
    single, cluster = modes
    print()
    print(
        f'end to end: route "limited" (key-auth, the key\'s limit and credits, rate-limit by '
        f"key, usage), nginx upstream, wrk -t1 -c{connections} -d{wrk_seconds}s, same run"
    )
    print(
        f"{'':14}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'gateway µs CPU/req':>21}{'redis µs CPU/req':>19}"
    )
    for m in modes:
        print(
            f"{m.name:14}{m.requests_per_second:10,.0f}{m.p50_ms:9.2f}{m.p99_ms:9.2f}"
            f"{m.gateway_cpu_us:21.1f}{m.redis_cpu_us:19.1f}"
        )
    print(
        f"added by cluster limits: {cluster.gateway_cpu_us - single.gateway_cpu_us:+.1f} µs "
        f"gateway CPU per request (+{cluster.redis_cpu_us:.1f} µs in Redis), "
        f"p50 {cluster.p50_ms - single.p50_ms:+.2f} ms, "
        f"p99 {cluster.p99_ms - single.p99_ms:+.2f} ms"
    )
    if report is not None:
        doc = {
            "command": "python -m benchmarks cluster",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seconds": wrk_seconds,
            "connections": connections,
            "modes": [asdict(m) for m in modes],
        }
        Path(report).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"report: {report}")
    return modes
