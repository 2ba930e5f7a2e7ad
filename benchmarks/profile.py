"""Where a triogate request's CPU goes: one target under load, sampled.

``python -m benchmarks profile [--target limited|key|nokey|bare] [--seconds N]``

Starts the same nginx upstream and ``triogate serve`` as the proxy
benchmark (same config, same keys, same pinning: server on one core, wrk on
the other), loads one target with wrk, and meanwhile samples the server with
py-spy (``pip install py-spy``; it reads the process's memory, so it needs
ptrace rights: root, or ``kernel.yama.ptrace_scope = 0``). Prints:

* CPU per request of the answering process over the sampled window (its own
  CPU time / requests served), the figure issue 11's targets are set in;
* the functions with the most *own* samples (where the interpreter is), and
  the ones with the most samples *under* them (which layer costs what),
  each as a share of all samples and as µs per request (share x CPU/req).

``--raw FILE`` keeps the collapsed stacks (one line per distinct stack, as
``flamegraph.pl`` and speedscope read them). The sampler costs the server
some CPU too (it stops the process ~``--rate`` times a second), so the CPU
per request here is a little above the proxy benchmark's; compare profiles
with profiles.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import bench_load as load
from . import bench_servers as servers
from . import proxy

TARGETS = ("limited", "key", "nokey", "bare")


def _collapsed(path: Path) -> collections.Counter[tuple[str, ...]]:
    """py-spy's raw format: ``frame;frame;...;frame COUNT`` per line."""
    stacks: collections.Counter[tuple[str, ...]] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def _short(frame: str, lines: bool = False) -> str:
    # "handle (triogate/dataplane/pipeline.py:212)" -> "handle (dataplane/pipeline.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file, _, _line = where.rpartition(":")
    for marker in ("/triogate/", "/site-packages/", "/lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    if lines and _line:
        file = f"{file}:{_line}"
    return f"{name} ({file})" if file else name


def _tables(
    stacks: collections.Counter[tuple[str, ...]], top: int, lines: bool = False
) -> tuple[list[tuple[str, int]], list[tuple[str, int]], int]:
    own: collections.Counter[str] = collections.Counter()
    under: collections.Counter[str] = collections.Counter()
    total = 0
    for stack, count in stacks.items():
        total += count
        frames = [_short(f) for f in stack]
        if frames:
            own[_short(stack[-1], lines)] += count
        for frame in set(frames):
            under[frame] += count
    return own.most_common(top), under.most_common(top), total


def run(args: argparse.Namespace) -> int:
    nginx = proxy._find("nginx")
    wrk = proxy._find("wrk")
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        servers._fail("py-spy is not installed: pip install py-spy")
    server_core = proxy._core(args.server_core, "server")
    load_core = proxy._core(args.load_core, "load")
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="triogate-prof-")))
        upstream_port = servers._free_port()
        upstream = servers._start_nginx(
            stack,
            nginx,
            tmp,
            "upstream",
            servers._write_upstream_conf(tmp, upstream_port),
            proxy._core(args.upstream_core, "upstream"),
        )
        servers._wait_port(upstream, upstream_port)
        if args.target == "bare":
            port = servers._free_port()
            server = servers._start_bare(stack, tmp, port, upstream_port, server_core)
            servers._wait_port(server, port)
            target = load.Target(
                "bare", f"http://{servers.HOST}:{port}/nokey/{servers.REQUEST_PATH}"
            )
        else:
            data_dir = tmp / "data"
            data_dir.mkdir()
            keys = servers.create_bench_keys(data_dir)
            conf = servers._triogate_conf(tmp, data_dir, upstream_port)
            server, url, _admin = servers._start_triogate(stack, tmp, conf, server_core)
            headers = keys.headers(args.target)
            target = load.Target(
                args.target, f"{url}/{args.target}/{servers.REQUEST_PATH}", headers
            )
        load._verify(target)
        load._wrk(
            wrk,
            target,
            seconds=args.warmup,
            connections=args.connections,
            core=load_core,
            latency=False,
        )
        raw = Path(args.raw) if args.raw else tmp / "stacks.txt"
        cpu_before = servers._cpu_seconds(server.proc.pid)
        sampler = subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(server.proc.pid),
                "--format",
                "raw",
                "--rate",
                str(args.rate),
                "--duration",
                str(args.seconds + 1),
                "--output",
                str(raw),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.5)  # the sampler attaches before the load starts
        output = load._wrk(
            wrk,
            target,
            seconds=args.seconds,
            connections=args.connections,
            core=load_core,
            latency=True,
        )
        cpu = servers._cpu_seconds(server.proc.pid) - cpu_before
        _, err = sampler.communicate(timeout=args.seconds + 30)
        result = load.parse_wrk(output)
        if sampler.returncode != 0 or not raw.exists():
            servers._fail(f"py-spy failed ({sampler.returncode}):\n{err}")
        stacks = _collapsed(raw)
    per_request_us = cpu / max(result.requests, 1) * 1e6
    own, under, total = _tables(stacks, args.top, args.lines)
    print(
        f"target {target.name}: {result.requests:,} requests, "
        f"{result.requests_per_second:,.0f} req/s under py-spy "
        f"at {args.rate} Hz; CPU per request {per_request_us:.1f} µs (incl. the sampler's cost)"
    )
    print(f"{total:,} samples\n")
    for title, rows in (
        ("own time (where the interpreter is)", own),
        ("inclusive (what runs under it)", under),
    ):
        print(f"{title}:")
        for frame, count in rows:
            share = count / total
            print(f"  {share * 100:5.1f}%  {share * per_request_us:6.1f} µs  {frame}")
        print()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", choices=TARGETS, default="limited")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--lines", action="store_true", help="own time by source line")
    parser.add_argument("--raw", help="keep the collapsed stacks in this file")
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--load-core", type=int, default=1)
    parser.add_argument(
        "--upstream-core",
        type=int,
        default=1,
        help="core for the nginx upstream (default: wrk's, so that waking it does not "
        "preempt the server and land in its samples)",
    )
    try:
        return run(parser.parse_args(argv))
    except servers.BenchError as exc:
        print(f"profile: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
