"""Cluster limits (``core/cluster``): what a decision in Redis costs, next to
the single node's in-memory decision, in the same run.

* local: ``actor.admit_nowait`` (a limit and credits), the actors' own state;
* cluster, one at a time: ``ClusterLimits.decide`` awaited alone (a pipeline
  of one): the added latency of a lone request, and its client CPU;
* cluster, concurrent: ``--concurrency`` tasks deciding at once, batched into
  shared pipelines: decisions per second and client CPU per decision;
* raw RESP (when ``hiredis`` is installed): the same EVALSHA pipelines over a
  bare trio socket with ``hiredis.Reader``, for comparison with coredis.

CPU is this process's (``time.process_time``); Redis's own is not counted.
Against ``--redis-url``, or a ``redis-server`` started in a temp directory.

``python -m benchmarks cluster [--seconds S] [--concurrency C] [--keys K]``.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio

from triogate.cluster.decide import decide_call
from triogate.cluster.limits import ClusterLimits, open_cluster_limits
from triogate.cluster.lua import DECIDE
from triogate.config import ClusterConfig
from triogate.dataplane.actors import ActorRegistry
from triogate.policy.ratelimit import Limit
from triogate.storage import Credits, MemoryStore
from triogate.testing import key_record

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


async def _raw_resp(url: str, keys: int, seconds: float, batch: int) -> tuple[float, float] | None:
    """(decisions/s, µs CPU per decision): EVALSHA pipelines of ``batch`` over a
    bare trio socket with hiredis.Reader (None without hiredis)."""
    try:
        # Optional (not a dependency): imported by name so the type check
        # does not need it installed.
        hiredis: Any = importlib.import_module("hiredis")
    except ImportError:
        return None
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    reader = hiredis.Reader()

    def encode(*parts: str) -> bytes:
        out = [b"*%d\r\n" % len(parts)]
        for p in parts:
            b = p.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        return b"".join(out)

    await stream.send_all(encode("SCRIPT", "LOAD", DECIDE.source))
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
            payload.append(encode("EVALSHA", DECIDE.sha, str(len(k)), *k, *a))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks cluster")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--redis-url", default=None)
    args = parser.parse_args(argv)
    print(describe("not pinned"))
    local_rate, local_cpu = _local(args.keys, args.seconds)
    print(f"local (in-memory actors)   {local_rate:12,.0f} decisions/s  {local_cpu:7.1f} µs CPU")
    with _redis(args.redis_url) as url:

        async def cluster_part() -> None:
            config = ClusterConfig(redis_url=url, command_timeout_seconds=5.0)
            async with open_cluster_limits(config) as cluster:
                await _sequential(cluster, args.keys, 0.2)  # warm up, load the scripts
                wall, cpu = await _sequential(cluster, args.keys, args.seconds)
                print(
                    f"cluster, one at a time     {1e6 / wall:12,.0f} decisions/s  "
                    f"{cpu:7.1f} µs CPU  {wall:7.1f} µs latency"
                )
                before = (cluster.batcher.stats.calls, cluster.batcher.stats.pipelines)
                rate, cpu, latency = await _concurrent(
                    cluster, args.keys, args.seconds, args.concurrency
                )
                stats = cluster.batcher.stats
                calls, pipelines = stats.calls - before[0], stats.pipelines - before[1]
                print(
                    f"cluster, {args.concurrency} concurrent     {rate:12,.0f} decisions/s  "
                    f"{cpu:7.1f} µs CPU  {latency:7.1f} µs latency  "
                    f"({calls / max(1, pipelines):.1f} per pipeline)"
                )
                print(f"added CPU per decision (batched): {cpu - local_cpu:.1f} µs")
            raw = await _raw_resp(url, args.keys, args.seconds, 100)
            if raw is not None:
                print(
                    f"raw RESP + hiredis, 100/pipeline {raw[0]:8,.0f} decisions/s  "
                    f"{raw[1]:7.1f} µs CPU (comparison only)"
                )

        trio.run(cluster_part)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
