"""Per-key actors: admission decisions per second (synchronous path against a
mailbox round trip), and the memory of 100,000 live actors.

* sync: ``actor.admit_nowait`` as key-auth calls it (the key's own limit and
  its credits, all-or-nothing), round-robin over many keys;
* mailbox: the same decision asked as a message of a task that owns the
  actors, over a trio memory channel, the answer sent back with an Event (a
  task switch there and back): what a message-passing actor would cost per
  request, and why the gateway's actors have no mailbox;
* memory: RSS before and after spawning 100,000 actors (each admitted once,
  so each holds limiter state), after they are flushed to a real LMDB and
  evicted, and the flush's cost. Measured first, right after the imports,
  as in a server: not after the decision loops' garbage.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import trio

from triogate.dataplane.actors import ActorRegistry, Admission, KeyActor
from triogate.policy.ratelimit import Limit
from triogate.storage import Credits, KeyRecord, MemoryStore, open_lmdb_store
from triogate.testing import key_record

from .machine import describe, pin


def _rss_mb(kind: str = "VmRSS") -> float:
    """Resident memory: ``VmRSS`` all of it, ``RssAnon`` the process's own
    (LMDB's file pages are ``RssFile``: page cache the kernel can drop)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(kind + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _record(i: int) -> KeyRecord:
    return key_record(f"key_{i:026d}", name="bench", credits=Credits(10**12), credits_set_at=0.0)


LIMITS = (Limit("burst", 1_000_000_000, 1.0),)


def bench_sync(keys: int, seconds: float) -> tuple[float, int]:
    registry = ActorRegistry(MemoryStore(), clock=time.time)
    records = [_record(i) for i in range(keys)]
    actors = [registry.actor(r.id) for r in records]
    pairs = list(zip(actors, records, strict=True))
    done = 0
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        now = time.time()
        for actor, record in pairs:
            admission = actor.admit_nowait(LIMITS, now, record=record, use_credits=True)
        done += len(pairs)
    assert admission.allowed
    return done / (time.perf_counter() - start), done


class _Ask:
    """One message: admit a request for ``record`` in ``actor``; the answer
    is put in ``answer`` and ``done`` set."""

    __slots__ = ("actor", "answer", "done", "record")

    def __init__(self, actor: KeyActor, record: KeyRecord) -> None:
        self.actor, self.record = actor, record
        self.done = trio.Event()
        self.answer: Admission | None = None


async def _owner(mail: trio.MemoryReceiveChannel[_Ask]) -> None:
    """The task that owns the actors: answers one message at a time."""
    async for ask in mail:
        ask.answer = ask.actor.admit_nowait(
            LIMITS, time.time(), record=ask.record, use_credits=True
        )
        ask.done.set()


async def _bench_mailbox(keys: int, seconds: float) -> float:
    registry = ActorRegistry(MemoryStore(), clock=time.time)
    records = [_record(i) for i in range(min(keys, 1000))]
    pairs = [(registry.actor(r.id), r) for r in records]
    done = 0
    send, receive = trio.open_memory_channel[_Ask](64)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_owner, receive)
        deadline = time.perf_counter() + seconds
        start = time.perf_counter()
        while time.perf_counter() < deadline:
            for actor, record in pairs:
                ask = _Ask(actor, record)
                await send.send(ask)
                await ask.done.wait()
            done += len(pairs)
        elapsed = time.perf_counter() - start
        assert ask.answer is not None and ask.answer.allowed
        nursery.cancel_scope.cancel()
    return done / elapsed


async def _bench_memory(count: int, data_dir: Path, waves: int = 3) -> dict[str, object]:
    """``waves`` times: spawn ``count`` new actors (each admitted once and
    counted), flush them to LMDB, evict them. Live and after-eviction
    memory per wave: flat means evicted memory is reused, not leaked."""
    gc.collect()
    before = _rss_mb()
    before_anon = _rss_mb("RssAnon")
    per_wave: list[tuple[float, float, float, float]] = []
    async with open_lmdb_store(data_dir, map_size=1 << 30) as store:
        registry = ActorRegistry(store, clock=time.time, idle_timeout=3600, flush_interval=3600)
        async with trio.open_nursery() as nursery:
            await nursery.start(registry.run)
            for wave in range(waves):
                now = time.time()
                for i in range(wave * count, (wave + 1) * count):
                    record = _record(i)
                    actor = registry.actor(record.id)
                    actor.admit_nowait(LIMITS, now, record=record, use_credits=True)
                    actor.record_nowait(200, now)
                gc.collect()
                live, live_anon = _rss_mb(), _rss_mb("RssAnon")
                t = time.perf_counter()
                await registry.flush(list(registry._dirty.values()))
                flush_s = time.perf_counter() - t
                registry.idle_timeout = 0.0
                await registry.evict_idle()
                registry.idle_timeout = 3600
                gc.collect()
                assert not registry.actors
                per_wave.append((live, live_anon, _rss_mb("RssAnon"), flush_s))
            nursery.cancel_scope.cancel()
    return {"before": before, "before_anon": before_anon, "waves": per_wave}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks actors", description=__doc__)
    parser.add_argument("--keys", type=int, default=10_000, help="keys for the decision loops")
    parser.add_argument("--seconds", type=float, default=3.0, help="per decision benchmark")
    parser.add_argument("--memory-keys", type=int, default=100_000, help="actors for memory")
    parser.add_argument("--core", type=int, default=0, help="CPU core to pin to (-1: none)")
    args = parser.parse_args(argv)
    pinning = pin(None if args.core < 0 else args.core)
    print("benchmark: per-key actors (admission decisions, memory)")
    print(describe(pinning))
    # Memory first, in a process that has only imported the gateway, as a
    # server holds its live keys; the decision loops below leave their own
    # garbage in the allocator's arenas (~35 MB), which is not the keys'.
    with tempfile.TemporaryDirectory() as tmp:
        mem = trio.run(_bench_memory, args.memory_keys, Path(tmp))
    sync_rate, _ = bench_sync(args.keys, args.seconds)
    mailbox_rate = trio.run(_bench_mailbox, args.keys, args.seconds)
    print(f"decisions/s, synchronous admit_nowait over {args.keys:,} keys: {sync_rate:,.0f}")
    print(
        f"decisions/s, message round trip to an owner task:        {mailbox_rate:,.0f}"
        f"  ({1e6 / mailbox_rate:.1f} µs vs {1e6 / sync_rate:.1f} µs each)"
    )
    verdict = "meets" if sync_rate >= 500_000 else "BELOW"
    print(f"target: >= 500,000 decisions/s (synchronous path): {verdict}")
    waves = mem["waves"]
    assert isinstance(waves, list)
    print(
        f"memory, {args.memory_keys:,} live actors (RSS; process-private RssAnon in brackets), "
        f"before: {mem['before']:.0f} MB [{mem['before_anon']:.0f} MB]"
    )
    for i, (live, live_anon, evicted_anon, flush_s) in enumerate(waves, 1):
        print(
            f"  wave {i}: live {live:.0f} MB [{live_anon:.0f} MB]; flushed in {flush_s:.2f} s "
            f"(one LMDB write transaction per 2,048 keys); evicted: [{evicted_anon:.0f} MB]"
        )
    print(
        "  (evicted memory goes back to Python's allocator and is reused by the next wave, "
        "so waves stay flat; the allocator keeps its arenas rather than handing them to "
        "the OS; RSS beyond RssAnon is LMDB's file pages, page cache)"
    )
    peak = max(w[0] for w in waves)
    verdict = "meets" if peak < 200 else "BELOW"
    print(
        f"target: {args.memory_keys:,} active keys under 200 MB RSS: peak {peak:.0f} MB, {verdict}"
    )
    return 0
