"""Cluster limits (``core/cluster``): what a decision in Redis costs, next to
the single node's in-memory decision, in the same run.

* local: ``actor.admit_nowait`` (a limit and credits), the actors' own state;
* cluster, one at a time: ``ClusterLimits.decide`` awaited alone (a pipeline
  of one): the added latency of a lone request, and its client CPU;
* cluster, concurrent: ``--concurrency`` tasks deciding at once, batched into
  shared pipelines: decisions per second and client CPU per decision;
* both cluster modes twice, same run: decisions over the batcher's thin path
  (``core/cluster/resp.py``, what a node uses) and over coredis pipelines
  (``open_cluster_limits(thin=False)``, what a Sentinel URL uses), in
  ``--rounds`` alternating rounds (medians: the machine may be shared);
* raw RESP: bare EVALSHA pipelines over a trio socket with
  ``hiredis.Reader``, no batcher, no ClusterLimits: the floor;
* end to end (``cluster_proxy``): a real gateway proxying with the full
  pipeline (key-auth, limits, credits, usage) to an nginx upstream under wrk,
  once a single node and once a cluster node: req/s, p50, p99 and CPU per
  request of both, so the added CPU and latency per request (needs nginx
  and wrk: ``bash benchmarks/setup.sh``; ``--no-proxy`` skips it).

CPU is this process's (``time.process_time``); Redis's own is not counted.
Against ``--redis-url``, or a ``redis-server`` started in a temp directory.

``python -m benchmarks cluster [--seconds S] [--concurrency C] [--keys K]
[--rounds R] [--connections N] [--report FILE.json] [--no-proxy]``.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import hiredis
import trio

from triogate.cluster.decide import decide_call
from triogate.cluster.limits import ClusterLimits, open_cluster_limits
from triogate.cluster.lua import DECIDE
from triogate.cluster.resp import encode_command, evalsha
from triogate.config import ClusterConfig
from triogate.dataplane.actors import ActorRegistry
from triogate.policy.ratelimit import Limit
from triogate.storage import Credits, MemoryStore
from triogate.testing import key_record

from .cluster_proxy import proxied
from .machine import describe

LIMITS = (Limit("burst", 1_000_000_000, 1.0),)


class Holder:
    def __init__(self, key: str) -> None:
        self.key = key
        self.credits: int | None = 10**12
        self.credits_version = 1
        self.credits_refilled_at: float | None = None

    def sync_credits(self, record: Any, now: float) -> None:
        pass


@contextmanager
def _redis(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found: sh tests/system/install.sh, or --redis-url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp]
        args += ["--save", "", "--appendonly", "no"]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        try:
            for _ in range(200):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                    break
                except OSError:
                    time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


def _local(keys: int, seconds: float) -> tuple[float, float]:
    """(decisions/s, µs CPU per decision) of the in-memory path."""
    registry = ActorRegistry(MemoryStore(), clock=time.time)
    records = [
        key_record(f"key_{i:026d}", name="b", credits=Credits(10**12), credits_set_at=0.0)
        for i in range(keys)
    ]
    pairs = [(registry.actor(r.id), r) for r in records]
    done = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline:
        now = time.time()
        for actor, record in pairs:
            actor.admit_nowait(LIMITS, now, record=record, use_credits=True)
        done += len(pairs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return done / wall, cpu / done * 1e6


async def _sequential(cluster: ClusterLimits, keys: int, seconds: float) -> tuple[float, float]:
    """(µs wall per decision, µs CPU per decision), one decision at a time."""
    holders = [Holder(f"key_{i}") for i in range(keys)]
    done = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline:
        holder = holders[done % keys]
        await cluster.decide([(holder.key, LIMITS[0])], time.time(), credits=holder)
        done += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return wall / done * 1e6, cpu / done * 1e6


async def _concurrent(
    cluster: ClusterLimits, keys: int, seconds: float, concurrency: int
) -> tuple[float, float, float]:
    """(decisions/s, µs CPU per decision, µs mean latency) with ``concurrency`` tasks."""
    holders = [Holder(f"key_{i}") for i in range(keys)]
    done = 0
    waited = 0.0
    deadline = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        nonlocal done, waited
        n = i
        while time.perf_counter() < deadline:
            holder = holders[n % keys]
            n += concurrency
            started = time.perf_counter()
            await cluster.decide([(holder.key, LIMITS[0])], time.time(), credits=holder)
            waited += time.perf_counter() - started
            done += 1

    cpu0, t0 = time.process_time(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(concurrency):
            nursery.start_soon(worker, i)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return done / wall, cpu / done * 1e6, waited / done * 1e6


async def _raw_resp(url: str, keys: int, seconds: float, batch: int) -> tuple[float, float]:
    """(decisions/s, µs CPU per decision): EVALSHA pipelines of ``batch`` over a
    bare trio socket with hiredis.Reader."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    reader = hiredis.Reader()
    await stream.send_all(encode_command("SCRIPT", "LOAD", DECIDE.source))
    while reader.gets() is False:
        reader.feed(await stream.receive_some(65536))
    done = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline:
        payload = []
        for i in range(batch):
            subject = f"key_{(done + i) % keys}"
            k, a = decide_call("rawbench", [(subject, LIMITS[0])], [], time.time(), 1)
            payload.append(evalsha(DECIDE.sha, k, a))
        await stream.send_all(b"".join(payload))
        got = 0
        while got < batch:
            reply = reader.gets()
            if reply is False:
                reader.feed(await stream.receive_some(1 << 20))
                continue
            got += 1
        done += batch
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    await stream.aclose()
    return done / wall, cpu / done * 1e6


Figures = dict[tuple[str, str], list[tuple[float, float, float, float]]]


async def _rounds(nodes: dict[str, ClusterLimits], args: argparse.Namespace) -> Figures:
    """Each (path, mode) measured ``args.rounds`` times, the paths alternating,
    ``args.seconds`` split between the rounds: (decisions/s, µs CPU,
    µs latency, decisions per pipeline) per round."""
    out: Figures = {}
    share = args.seconds / args.rounds
    for _ in range(args.rounds):
        for name, node in nodes.items():
            wall, cpu = await _sequential(node, args.keys, share)
            out.setdefault((name, "one at a time"), []).append((1e6 / wall, cpu, wall, 1.0))
            stats = node.batcher.stats
            before = (stats.calls, stats.pipelines)
            rate, cpu, latency = await _concurrent(node, args.keys, share, args.concurrency)
            per = (stats.calls - before[0]) / max(1, stats.pipelines - before[1])
            out.setdefault((name, f"{args.concurrency} concurrent"), []).append(
                (rate, cpu, latency, per)
            )
    return out


def _print_cluster(figures: Figures, concurrency: int, local_cpu: float) -> None:
    medians = {
        key: tuple(statistics.median(r[i] for r in runs) for i in range(4))
        for key, runs in figures.items()
    }
    for (path, mode), (rate, cpu, latency, per) in medians.items():
        print(
            f"cluster, {path:9} {mode:14} {rate:9,.0f} decisions/s  {cpu:7.1f} µs CPU  "
            f"{latency:8.1f} µs latency  ({per:.1f} per pipeline)"
        )
    for mode in ("one at a time", f"{concurrency} concurrent"):
        thin, plain = medians[("thin path", mode)][1], medians[("coredis", mode)][1]
        print(
            f"{mode}: thin path {thin:.1f} µs vs coredis {plain:.1f} µs CPU per decision "
            f"({thin / plain:.2f}x); added to a local decision: {thin - local_cpu:.1f} µs"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks cluster")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per path")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (end to end)")
    parser.add_argument("--report", default=None, help="write the end-to-end figures as JSON")
    parser.add_argument("--no-proxy", action="store_true", help="decisions only, no end to end")
    args = parser.parse_args(argv)
    print(describe("not pinned"))
    local_rate, local_cpu = _local(args.keys, args.seconds)
    print(f"local (in-memory actors)   {local_rate:12,.0f} decisions/s  {local_cpu:7.1f} µs CPU")
    with _redis(args.redis_url) as url:

        async def cluster_part() -> None:
            config = ClusterConfig(redis_url=url, command_timeout_seconds=5.0)
            async with (
                open_cluster_limits(config, thin=True) as thin,
                open_cluster_limits(config, thin=False) as plain,
            ):
                nodes = {"thin path": thin, "coredis": plain}
                for node in nodes.values():
                    await _sequential(node, args.keys, 0.2)  # warm up, load the scripts
                figures = await _rounds(nodes, args)
            raw = await _raw_resp(url, args.keys, args.seconds, 100)
            _print_cluster(figures, args.concurrency, local_cpu)
            print(
                f"raw RESP + hiredis, 100/pipeline {raw[0]:8,.0f} decisions/s  "
                f"{raw[1]:7.1f} µs CPU (the floor: no batcher, no ClusterLimits)"
            )

        trio.run(cluster_part)
    if not args.no_proxy:
        proxied(args.seconds, args.connections, args.report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
