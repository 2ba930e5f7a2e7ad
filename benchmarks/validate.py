"""Key validations per second, in process, on a real LMDB.

One validation is the whole hot-path decision the key-auth plugin makes: the
checksum check, the HMAC-SHA256 digest, the digest -> id and id -> record
LMDB lookups, the msgpack decode, and the status, expiry and scope checks.
No HTTP. Keys are drawn at random from the population so lookups are not
all served from one warm page.

A second figure is the data plane's own check (``KeyValidation``, what
key-auth calls) on keys that have a plan and an identity (issue 12): those
cost one more read snapshot (the key again, its plan, its identity) and the
effective settings.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import trio

from triogate.config import parse_config
from triogate.control.audit import Actor
from triogate.control.customer_models import CreateIdentityRequest, CreatePlanRequest
from triogate.control.keycache import LookupCache
from triogate.control.keyresolve import KeyAccess, KeyResolver
from triogate.control.models import CreateKeyRequest
from triogate.dataplane.plugin_services import KeyValidation
from triogate.errors import KeyVerdict
from triogate.runtime.gateway import open_gateway

from .machine import describe, pin


async def _populate(data_dir: Path, n_keys: int) -> tuple[list[str], list[str]]:
    config = parse_config({"server": {"data_dir": str(data_dir)}}, environ={})
    plaintexts: list[str] = []
    customers: list[str] = []
    async with open_gateway(config) as gw:
        req = CreateKeyRequest(name="bench", owner="bench", scopes=["users:*", "orders:read"])
        # Keys with a plan (its scopes) and an identity: 1,000 of them over 100 identities.
        plan = await gw.plans.create(
            CreatePlanRequest(name="bench", scopes=["users:*", "orders:read"]), Actor("bench")
        )
        for i in range(100):
            identity = await gw.identities.create(
                CreateIdentityRequest(external_id=f"bench-{i}"), Actor("bench")
            )
            for _ in range(10):
                created = await gw.keys.create(
                    CreateKeyRequest(
                        name="bench", owner="bench", plan_id=plan.id, identity_id=identity.id
                    ),
                    Actor("bench"),
                )
                customers.append(created.key)
        async with trio.open_nursery() as nursery:
            # Concurrent creates share group commits: quick to populate.
            async def make(count: int) -> None:
                for _ in range(count):
                    created = await gw.keys.create(req, Actor("bench"))
                    plaintexts.append(created.key)

            for _ in range(50):
                nursery.start_soon(make, n_keys // 50)
    return plaintexts, customers


def _rate(check: object, sample: list[str], seconds: float) -> float:
    """Calls per second of ``check(key, scopes)`` over ``sample``."""
    assert callable(check)
    scopes = ("users:read",)
    done = 0
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        for key in sample:
            check(key, scopes)
        done += len(sample)
    return done / (time.perf_counter() - start)


async def _measure(
    data_dir: Path, keys: list[str], customers: list[str], seconds: float
) -> dict[str, float]:
    config = parse_config({"server": {"data_dir": str(data_dir)}}, environ={})
    async with open_gateway(config) as gw:
        service = gw.keys
        sample = [random.choice(keys) for _ in range(100_000)]
        scopes = ("users:read",)
        # Warm up, and check the answer is the one we think we measure.
        for key in sample[:1000]:
            record, verdict, _ = service.validate_nowait(key, scopes)
            assert record is not None and verdict is None, verdict
        bad = service.format.generate()
        assert service.validate_nowait(bad, scopes)[1] is KeyVerdict.INVALID_KEY

        rate = _rate(service.validate_nowait, sample[:10_000], seconds)

        # Every lookup a miss: as after a write to the store, or with more
        # keys in use than the cache holds (control/keycache.py).
        cached = service._lookups
        service._lookups = LookupCache(size=0)
        uncached_rate = _rate(service.validate_nowait, sample[:10_000], seconds)

        # Where the time goes, step by step (a lookup without the cache).
        n = 50_000
        t0 = time.perf_counter()
        for key in sample[:n]:
            service.format.is_well_formed(key)
        t1 = time.perf_counter()
        for key in sample[:n]:
            gw.secrets.hmac.digest(key)
        t2 = time.perf_counter()
        for key in sample[:n]:
            service.lookup_nowait(key)
        t3 = time.perf_counter()
        service._lookups = cached

        # The data plane's check: plain keys, then keys with a plan and an identity.
        validation = KeyValidation(service, KeyResolver(gw.store))
        consumer, _ = validation.check_nowait(customers[0], ("users:read",))
        assert isinstance(consumer, KeyAccess) and consumer.identity is not None
        plain_rate = _rate(validation.check_nowait, sample[:10_000], seconds)
        customer_sample = [random.choice(customers) for _ in range(10_000)]
        customer_rate = _rate(validation.check_nowait, customer_sample, seconds)
    return {
        "dataplane_plain_per_second": plain_rate,
        "dataplane_customer_per_second": customer_rate,
        "validations_per_second": rate,
        "uncached_per_second": uncached_rate,
        "us_per_validation": 1e6 / rate,
        "us_checksum": (t1 - t0) / n * 1e6,
        "us_digest": (t2 - t1) / n * 1e6,
        "us_lookup_incl_checksum_digest": (t3 - t2) / n * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks validate", description=__doc__)
    parser.add_argument("--keys", type=int, default=10_000, help="population size")
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time")
    parser.add_argument("--core", type=int, default=0, help="CPU core to pin to (-1: none)")
    args = parser.parse_args(argv)
    pinning = pin(None if args.core < 0 else args.core)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        t = time.perf_counter()
        keys, customers = trio.run(_populate, data_dir, args.keys)
        populate_s = time.perf_counter() - t
        result = trio.run(_measure, data_dir, keys, customers, args.seconds)
    print("benchmark: key validation, in process (checksum, HMAC digest, LMDB lookup, decision)")
    print(describe(pinning))
    print(f"population: {len(keys)} keys in LMDB (created in {populate_s:.1f} s)")
    r = result
    print(
        f"validations/s: {r['validations_per_second']:,.0f}  ({r['us_per_validation']:.2f} µs each)"
    )
    print(
        f"  the same keys again, nothing written in between: lookups from the cache; "
        f"every lookup a miss (no cache): {r['uncached_per_second']:,.0f}/s "
        f"({1e6 / r['uncached_per_second']:.2f} µs each)"
    )
    print(
        f"  of which, without the cache: checksum {r['us_checksum']:.2f} µs, "
        f"digest {r['us_digest']:.2f} µs, "
        f"checksum+digest+lookup+decode {r['us_lookup_incl_checksum_digest']:.2f} µs"
    )
    print(
        f"data plane check (key-auth's): {r['dataplane_plain_per_second']:,.0f}/s plain keys, "
        f"{r['dataplane_customer_per_second']:,.0f}/s keys with a plan and an identity "
        f"({len(customers)} such keys)"
    )
    target = 100_000
    for label, figure in (
        ("validations", result["validations_per_second"]),
        ("validations, every lookup a miss", result["uncached_per_second"]),
        ("plan+identity keys", result["dataplane_customer_per_second"]),
    ):
        verdict = "meets" if figure >= target else "BELOW"
        print(f"target: >= {target:,}/s on one core ({label}): {verdict}")
    return 0
