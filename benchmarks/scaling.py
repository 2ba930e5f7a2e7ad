"""triogate with ``server.workers = 1`` and then ``= 2``, side by side.

The full pipeline (key-auth + rate-limit + usage) behind the proxy
benchmark's nginx upstream, loaded by wrk. Nothing is pinned: the workers,
the upstream and wrk share every core of the machine. On a 2-core machine
the load generator therefore competes with the workers for the second core,
so the comparison is bounded by what wrk and the upstream leave (one worker
alone cannot use it, two can) and says little about a core added for the
gateway alone; on a machine with cores to spare for wrk and the upstream it
shows the scaling. CPU per request is the server's own CPU time (the
supervisor and all its workers) divided by the requests served.

Each setting gets a fresh server on a fresh data directory, a warm-up and
one measured run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import bench_load as load
from . import bench_servers as servers
from . import bench_summary as summary
from . import proxy
from .machine import describe


@dataclass(frozen=True)
class ScalingRow:
    workers: int
    requests_per_second: float
    p99_ms: float
    cpu_us_per_request: float
    errors: int


def workers_conf(base: str, port: int, workers: int) -> str:
    """The proxy benchmark's triogate config with a fixed proxy port (the
    workers share it) and ``server.workers``."""
    any_port = f'proxy_listen = "{servers.HOST}:0"'
    if any_port not in base:
        raise servers.BenchError("the proxy benchmark's config has no proxy_listen to replace")
    return base.replace(any_port, f'proxy_listen = "{servers.HOST}:{port}"\nworkers = {workers}', 1)


def format_rows(rows: list[ScalingRow]) -> str:
    lines = [
        "| server.workers | req/s | p99 | CPU per request (all workers) | errors |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        errors = "none" if r.errors == 0 else f"{r.errors:,}"
        lines.append(
            f"| {r.workers} | {r.requests_per_second:,.0f} | {r.p99_ms:.2f} ms "
            f"| {r.cpu_us_per_request:,.0f} µs | {errors} |"
        )
    return "\n".join(lines)


def _await_workers(gateway: servers.Managed, stdout: Path, workers: int) -> None:
    """Every worker listening (each prints its own line), not just the first."""
    deadline = time.monotonic() + servers.START_TIMEOUT
    while time.monotonic() < deadline:
        gateway.check_alive()
        if stdout.read_text(errors="replace").count("triogate: proxy listening on") >= workers:
            return
        time.sleep(0.05)
    raise servers.BenchError(f"not all {workers} workers listened within {servers.START_TIMEOUT} s")


def _measure(
    args: argparse.Namespace, wrk: str, tmp: Path, upstream_port: int, workers: int
) -> ScalingRow:
    run_dir = tmp / f"workers-{workers}"
    run_dir.mkdir()
    data_dir = run_dir / "data"
    data_dir.mkdir()
    limited_key = servers._create_key(
        data_dir,
        "bench-limited",
        ["--rate-limit", f"burst={servers.NEVER}/1", "--credits", str(servers.CREDITS)],
    )
    servers._create_admin(data_dir)
    conf = servers._triogate_conf(run_dir, data_dir, upstream_port)
    port = servers._free_port()
    while port == upstream_port:
        port = servers._free_port()
    conf.write_text(workers_conf(conf.read_text(), port, workers))
    with contextlib.ExitStack() as stack:
        # Not servers._start_triogate: with several workers each announces
        # itself with a "(worker I)" suffix; the port is fixed here anyway.
        gateway = servers._start(
            stack,
            f"triogate (workers = {workers})",
            [sys.executable, "-m", "triogate", "serve", "-c", str(conf)],
            core=None,
            stdout=run_dir / "triogate.out",
            stderr=run_dir / "triogate.err",
        )
        url = f"http://{servers.HOST}:{port}"
        target = load.Target(
            summary.LIMITED,
            f"{url}/limited/{servers.REQUEST_PATH}",
            (("X-API-Key", limited_key.key),),
            (("RateLimit-Policy", '"burst"'),),
        )
        _await_workers(gateway, run_dir / "triogate.out", workers)
        load._verify(target)
        wrk_args = {"connections": args.connections, "core": None}
        if args.warmup:
            load._wrk(wrk, target, seconds=args.warmup, latency=False, **wrk_args)
        gateway.check_alive()
        before = servers._cpu_seconds(gateway.proc.pid)
        output = load._wrk(wrk, target, seconds=args.seconds, latency=True, **wrk_args)
        cpu = servers._cpu_seconds(gateway.proc.pid) - before
        gateway.check_alive()
        result = load.parse_wrk(output)
        processes = 1 + len(servers._children(gateway.proc.pid))
    print(
        f"  workers = {workers}: {result.requests_per_second:,.0f} req/s, "
        f"p99 {result.p99_ms:.2f} ms, {cpu:.2f} s CPU over {processes} process(es)",
        flush=True,
    )
    return ScalingRow(
        workers,
        result.requests_per_second,
        result.p99_ms,
        cpu / max(result.requests, 1) * 1e6,
        result.errors,
    )


def run(args: argparse.Namespace) -> int:
    nginx = proxy._find("nginx")
    wrk = proxy._find("wrk")
    print(describe("nothing pinned: servers, upstream and wrk share all cores"), flush=True)
    print(
        f"wrk: 1 thread, {args.connections} connections, {args.warmup} s warm-up, "
        f"{args.seconds} s measured; target: {summary.LIMITED}",
        flush=True,
    )
    rows: list[ScalingRow] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="triogate-scale-")))
        upstream_port = servers._free_port()
        upstream = servers._start_nginx(
            stack, nginx, tmp, "upstream", servers._write_upstream_conf(tmp, upstream_port), None
        )
        servers._wait_port(upstream, upstream_port)
        for workers in args.workers:
            rows.append(_measure(args, wrk, tmp, upstream_port, workers))
    print()
    print(format_rows(rows))
    if (os.cpu_count() or 1) <= max(args.workers):
        print(
            f"\nnote: {os.cpu_count()} cores for {max(args.workers)} workers, the upstream and "
            "wrk: the load generator competes with the workers for the same cores, so this "
            "is not the gain of a core added for the gateway alone."
        )
    return 1 if any(r.errors for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks scaling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=int, default=10, help="measured seconds per setting")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds per setting")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1, 2],
        help="server.workers settings to measure, in order (default: 1 2)",
    )
    args = parser.parse_args(argv)
    if args.seconds < 1 or args.warmup < 0 or args.connections < 1 or min(args.workers) < 1:
        parser.error("--seconds, --connections and --workers must be >= 1, --warmup >= 0")

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return run(args)
    except servers.BenchError as exc:
        print(f"benchmarks scaling: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("benchmarks scaling: interrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
