"""The workers' shared decision table (``server.workers > 1``): what one
exact-across-processes decision costs, next to the one-process path.

* local: ``actor.admit_nowait`` (a limit and credits) with one worker, the
  actors' own in-memory state;
* shared, one process: the same call deciding in ``<data_dir>/limits/``
  (one LMDB write transaction: read, decide, write, commit without fsync);
* shared, N processes contending: N processes deciding on the same keys at
  once (LMDB serialises the writers); the time per decision in each, and
  all of them together.

``python -m benchmarks.sharedlimits [--processes N] [--keys K] [--seconds S]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from triogate.dataplane.actors import ActorRegistry
from triogate.dataplane.sharedlimits import SharedLimits
from triogate.policy.ratelimit import Limit
from triogate.storage import Credits, KeyRecord, MemoryStore
from triogate.testing import key_record

from .machine import describe

LIMITS = (Limit("burst", 1_000_000_000, 1.0),)


def _record(i: int) -> KeyRecord:
    return key_record(f"key_{i:026d}", name="bench", credits=Credits(10**12), credits_set_at=0.0)


def _loop(registry: ActorRegistry, keys: int, seconds: float) -> tuple[float, int]:
    """Decisions round-robin over ``keys`` keys for ``seconds``: (µs per
    decision, decisions)."""
    pairs = [(registry.actor(r.id), r) for r in (_record(i) for i in range(keys))]
    done = 0
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        now = time.time()
        for actor, record in pairs:
            admission = actor.admit_nowait(LIMITS, now, record=record, use_credits=True)
        done += len(pairs)
    elapsed = time.perf_counter() - start
    assert admission.allowed
    return elapsed / done * 1e6, done


def _registry(data_dir: Path | None, index: int = 0, workers: int = 2) -> ActorRegistry:
    registry = ActorRegistry(MemoryStore(), clock=time.time)
    if data_dir is not None:
        registry.set_worker(index, workers, SharedLimits.open(data_dir))
    return registry


def _contender(
    data_dir: str, index: int, workers: int, keys: int, seconds: float, go: Event, out: Any
) -> None:
    registry = _registry(Path(data_dir), index, workers)
    _loop(registry, keys, 0.2)  # warm up (and spawn the actors) before the start
    go.wait()
    out.put(_loop(registry, keys, seconds))
    assert registry.shared is not None
    registry.shared.close()


def contended(data_dir: Path, processes: int, keys: int, seconds: float) -> list[tuple[float, int]]:
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_contender, args=(str(data_dir), i, processes, keys, seconds, go, out))
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    time.sleep(1.0 + 0.2 * processes)  # every one warmed up (bounded: they start in < 1 s)
    go.set()
    results = [out.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks sharedlimits", description=__doc__)
    parser.add_argument("--keys", type=int, default=1000, help="keys decided round-robin")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--processes", type=int, default=2, help="contending processes")
    args = parser.parse_args(argv)
    print("benchmark: limit + credits decisions, one process vs shared across processes")
    print(describe("not pinned"))
    local, _ = _loop(_registry(None), args.keys, args.seconds)
    print(f"local (server.workers = 1):          {local:6.2f} µs per decision")
    with tempfile.TemporaryDirectory() as tmp:
        registry = _registry(Path(tmp))
        single, _ = _loop(registry, args.keys, args.seconds)
        assert registry.shared is not None
        registry.shared.close()
        print(f"shared, one process:                 {single:6.2f} µs per decision")
        results = contended(Path(tmp), args.processes, args.keys, args.seconds)
    each = ", ".join(f"{us:.2f}" for us, _ in results)
    total = sum(n for _, n in results) / args.seconds
    print(
        f"shared, {args.processes} processes contending:     {each} µs per decision each; "
        f"{total:,.0f} decisions/s together"
    )
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
