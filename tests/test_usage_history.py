"""Usage history: the per-minute counting of the hot path (bucket bounds,
a request exactly on a boundary), the flush into minute, hour and day
buckets, range queries and their bad input, and retention pruning, all
with explicit times over the in-memory store; and a gateway in-process on a
hand-moved clock, whose history matches what was sent by outcome."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from tests.conftest import FakeClock
from tests.helpers_gateway import bearer, setup_admin
from triogate.benchmarks.history_storage import measure
from triogate.control.history import (
    HistoryQuery,
    HistoryService,
    Retention,
    add_minutes,
    bucket_key,
    prune,
    prune_step,
    read_range,
    window,
)
from triogate.dataplane.actors import ActorRegistry
from triogate.dataplane.history import (
    ALLOWED,
    INVALID,
    QUOTA_EXCEEDED,
    RATE_LIMITED,
    UPSTREAM_ERROR,
    MinuteCounts,
    outcome_of,
)
from triogate.errors import NotFound, StorageFull, ValidationError
from triogate.storage import MemoryStore, Table
from triogate.testing import FakeResponse, FakeUpstream, open_harness

DAY = 86400
T0 = 1_800_000_000 - 1_800_000_000 % DAY  # a UTC midnight


def counts(**outcomes: int) -> tuple[int, ...]:
    """Ten counters: outcomes by name, every one a 2xx unless ``klass_N``."""
    names = ("allowed", "rate_limited", "quota_exceeded", "invalid", "upstream_error")
    out = [outcomes.get(n, 0) for n in names] + [0] * 5
    classes = [outcomes.get(f"c{i}", 0) for i in range(1, 6)]
    if not any(classes):
        classes[1] = sum(out[:5])
    out[5:] = classes
    return tuple(out)


def q(**raw: Any) -> HistoryQuery:
    return msgspec.convert(raw, HistoryQuery, strict=False)


def at(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


# ---- the hot path's minute counters --------------------------------------------------


def test_a_request_exactly_on_a_minute_boundary_counts_in_the_new_minute() -> None:
    m = MinuteCounts()
    m.count(T0 + 119.999, ALLOWED, 1)
    m.count(T0 + 120.0, RATE_LIMITED, 3)  # the boundary belongs to the minute it starts
    m.count(T0 + 179.999, RATE_LIMITED, 3)
    m.count(T0 + 60.0, INVALID, 3)  # a clock stepping back still lands in its minute
    taken = dict(m.take())
    base = T0 // 60
    assert taken == {
        base + 1: (1, 0, 0, 1, 0, 0, 1, 0, 1, 0),
        base + 2: (0, 2, 0, 0, 0, 0, 0, 0, 2, 0),
    }
    assert m.take() == ()  # taken: empty until the next count
    m.count(T0 + 120.5, ALLOWED, 1)
    assert dict(m.take()) == {base + 2: (1, 0, 0, 0, 0, 0, 1, 0, 0, 0)}


def test_restore_gives_a_failed_flush_back() -> None:
    m = MinuteCounts()
    m.count(T0, ALLOWED, 1)
    taken = m.take()
    m.count(T0 + 1, QUOTA_EXCEEDED, 3)
    m.restore(taken)
    assert dict(m.take()) == {T0 // 60: (1, 0, 1, 0, 0, 0, 1, 0, 1, 0)}


@pytest.mark.parametrize(
    ("status", "code", "outcome"),
    [
        (200, None, ALLOWED),
        (404, None, ALLOWED),
        (500, None, ALLOWED),
        (502, None, UPSTREAM_ERROR),
        (503, None, UPSTREAM_ERROR),
        (504, None, UPSTREAM_ERROR),
        (429, None, ALLOWED),  # the upstream's own 429: the key was let through
        (429, "RATE_LIMITED", RATE_LIMITED),
        (429, "QUOTA_EXCEEDED", QUOTA_EXCEEDED),
        (502, "UPSTREAM_UNAVAILABLE", UPSTREAM_ERROR),
        (504, "UPSTREAM_TIMEOUT", UPSTREAM_ERROR),
        (502, "BAD_GATEWAY", UPSTREAM_ERROR),
        (403, "KEY_DISABLED", INVALID),
        (413, "PAYLOAD_TOO_LARGE", ALLOWED),
        (503, "shutdown", ALLOWED),
    ],
)
def test_outcome_of_an_answer(status: int, code: str | None, outcome: int) -> None:
    assert outcome_of(status, code) == outcome


# ---- the flush: minutes into minute, hour and day buckets ----------------------------


async def test_flushed_minutes_add_up_in_minute_hour_and_day_buckets() -> None:
    store = MemoryStore()
    base = T0 // 60
    first = ((base + 59, counts(allowed=2)), (base + 60, counts(rate_limited=1, c4=1)))
    await store.write(lambda txn: add_minutes(txn, b"key_a", first))
    # A second flush (another worker) adds to the same buckets.
    await store.write(lambda txn: add_minutes(txn, b"key_a", [(base + 60, counts(allowed=3))]))
    with store.read() as txn:
        minutes = read_range(txn, b"key_a", "minute", base, base + 1440)
        hours = read_range(txn, b"key_a", "hour", base, base + 1440)
        days = read_range(txn, b"key_a", "day", base, base + 1440)
    assert minutes == [
        (base + 59, list(counts(allowed=2))),
        (base + 60, [3, 1, 0, 0, 0, 0, 3, 0, 1, 0]),
    ]
    assert hours == [(base, list(counts(allowed=2))), (base + 60, [3, 1, 0, 0, 0, 0, 3, 0, 1, 0])]
    assert days == [(base, [5, 1, 0, 0, 0, 0, 5, 0, 1, 0])]


async def test_a_range_is_one_owners_and_ends_before_its_end() -> None:
    store = MemoryStore()
    base = T0 // 60

    def write(txn: Any) -> None:
        add_minutes(txn, b"key_a", [(base + i, counts(allowed=1)) for i in range(5)])
        # An id that extends another's is not in its range.
        add_minutes(txn, b"key_ab", [(base + 1, counts(invalid=7, c4=7))])

    await store.write(write)
    with store.read() as txn:
        got = read_range(txn, b"key_a", "minute", base + 1, base + 4)
    assert [m for m, _ in got] == [base + 1, base + 2, base + 3]


def test_window_defaults_alignment_and_bounds() -> None:
    now = T0 + 10 * 3600 + 30 * 60  # 10:30
    first, end, start, to = window(q(granularity="hour"), now)
    assert (start, to) == (now - 23 * 3600 - 1800, now)  # 24 hour buckets, the current one too
    assert first == (T0 - 13 * 3600) // 60 and end == now // 60
    # ``from`` inside a bucket takes the whole bucket; ``to`` is exclusive.
    first, end, _, _ = window(
        q(granularity="hour", **{"from": at(T0 + 1800), "to": at(T0 + 7200)}), now
    )
    assert (first, end) == (T0 // 60, (T0 + 7200) // 60)
    # The most buckets a query may span, and one more.
    window(q(granularity="minute", **{"from": at(T0), "to": at(T0 + 1440 * 60)}), now)
    window(q(granularity="hour", **{"from": at(T0), "to": at(T0 + 2160 * 3600)}), now)
    window(q(granularity="day", **{"from": at(T0), "to": at(T0 + 366 * DAY)}), now)
    for granularity, span, most in (("minute", 60, 1440), ("hour", 3600, 2160), ("day", DAY, 366)):
        with pytest.raises(ValidationError) as info:
            window(
                q(granularity=granularity, **{"from": at(T0), "to": at(T0 + (most + 1) * span)}),
                now,
            )
        assert info.value.errors[0].path == "from"
    # A reversed range, and an empty one.
    for a, b in ((T0 + 60, T0), (T0, T0)):
        with pytest.raises(ValidationError) as info:
            window(q(**{"from": at(a), "to": at(b)}), now)
        assert info.value.errors[0].path == "from"


async def test_the_service_answers_404_400_and_sparse_items(memory_gateway: Any) -> None:
    store = memory_gateway.store
    history = HistoryService(store, clock=lambda: T0 + DAY)
    with pytest.raises(NotFound):
        history.key_history("key_01HZZZZZZZZZZZZZZZZZZZZZZZ", q())
    with pytest.raises(NotFound):
        history.identity_history("idn_01HZZZZZZZZZZZZZZZZZZZZZZZ", q())
    with pytest.raises(ValidationError):
        history.key_history("idn_01HZZZZZZZZZZZZZZZZZZZZZZZ", q())
    with pytest.raises(msgspec.ValidationError):
        q(granularity="week")
    key_id = "key_01HZZZZZZZZZZZZZZZZZZZZZZZ"
    await store.write(lambda txn: txn.put(Table.KEYS, key_id.encode(), b"\x90"))
    base = T0 // 60
    await store.write(
        lambda txn: add_minutes(
            txn, key_id.encode(), [(base + 5, counts(allowed=1, invalid=2, c2=1, c4=2))]
        )
    )
    got = history.key_history(
        key_id, q(granularity="minute", **{"from": at(T0), "to": at(T0 + 3600)})
    )
    doc = msgspec.json.decode(msgspec.json.encode(got))
    assert doc["from"] == at(T0).replace("+00:00", "Z")
    assert doc["items"] == [
        {
            "start": at(T0 + 300).replace("+00:00", "Z"),
            "total": 3,
            "allowed": 1,
            "rate_limited": 0,
            "quota_exceeded": 0,
            "invalid": 2,
            "upstream_error": 0,
            "by_status_class": {"1xx": 0, "2xx": 1, "3xx": 0, "4xx": 2, "5xx": 0},
        }
    ]


# ---- retention ------------------------------------------------------------------------


async def test_pruning_drops_buckets_past_their_retention_in_bounded_steps() -> None:
    store = MemoryStore()
    base = T0 // 60
    owners = [b"key_a", b"key_b", b"idn_c"]

    def write(txn: Any) -> None:
        for owner in owners:
            # Every hour of four days (each minute bucket is the hour's first).
            add_minutes(txn, owner, [(base + h * 60, counts(allowed=1)) for h in range(96)])

    await store.write(write)
    now = T0 + 4 * DAY  # midnight after the fourth day
    retention = Retention(days=2, minute_hours=3)
    # Step by step with a small budget: each step looks at a bounded number.
    cutoffs = retention.cutoffs(now)
    resume: bytes | None = None
    steps = 0
    while True:
        with store.read() as txn:
            doomed, resume = prune_step(txn, cutoffs, resume, budget=7)
        assert len(doomed) <= 7
        steps += 1
        if resume is None:
            break
        assert steps < 1000
    assert steps > 1
    deleted = await prune(store, retention, now)
    with store.read() as txn:
        for owner in owners:
            all_minutes = read_range(txn, owner, "minute", 0, 2**32 - 1)
            hours = read_range(txn, owner, "hour", 0, 2**32 - 1)
            days = read_range(txn, owner, "day", 0, 2**32 - 1)
            # Minutes: only those whose minute ended within the last 3 hours.
            assert [m for m, _ in all_minutes] == [base + h * 60 for h in (93, 94, 95)]
            # Hours ending at or after now - 2 days; days likewise (the
            # bucket that ends exactly on the cutoff is gone).
            assert [m for m, _ in hours] == [base + h * 60 for h in range(48, 96)]
            assert [m for m, _ in days] == [base + d * 1440 for d in (2, 3)]
        assert len(list(txn.scan(Table.USAGE_HISTORY))) == 3 * (3 + 48 + 2)
    assert deleted == 3 * ((96 - 3) + 48 + 2)
    assert await prune(store, retention, now) == 0  # nothing left to do, nothing written


def test_minute_retention_is_at_most_the_whole_retention() -> None:
    cut = Retention(days=1, minute_hours=48).cutoffs(T0 + DAY)
    assert cut[b"m"] == cut[b"h"] + 59 == T0 // 60


# ---- the actors: record, refuse, flush --------------------------------------------------


async def test_an_actor_flushes_its_minutes_with_its_counters() -> None:
    store = MemoryStore()
    clock = FakeClock(T0 + 30)
    registry = ActorRegistry(store, clock=clock)
    actor = registry.actor("key_a")
    actor.record_nowait(200, clock(), ALLOWED)
    actor.record_nowait(429, clock(), RATE_LIMITED)
    actor.record_nowait(502, T0 + 60, UPSTREAM_ERROR)  # the next minute
    await registry.flush([actor])
    with store.read() as txn:
        got = dict(read_range(txn, b"key_a", "minute", 0, 2**32 - 1))
        assert txn.get(Table.USAGE_HISTORY, bucket_key(b"key_a", b"d", T0 // 60)) is not None
    assert got == {
        T0 // 60: [1, 1, 0, 0, 0, 0, 1, 0, 1, 0],
        T0 // 60 + 1: [0, 0, 0, 0, 1, 0, 0, 0, 0, 1],
    }
    assert actor.snapshot().requests == 3


class _HistoryFull:
    """A write transaction whose history puts do not fit (``StorageFull``)."""

    def __init__(self, txn: Any) -> None:
        self._txn = txn
        self.get, self.scan, self.delete = txn.get, txn.scan, txn.delete

    def put(self, table: Table, key: bytes, value: bytes) -> None:
        if table is Table.USAGE_HISTORY:
            raise StorageFull("the store is full")
        self._txn.put(table, key, value)


class FullForHistory(MemoryStore):
    full = True

    async def write(self, fn: Any) -> Any:
        if not self.full:
            return await super().write(fn)
        return await super().write(lambda txn: fn(_HistoryFull(txn)))


async def test_a_full_store_writes_the_counters_and_keeps_the_history_for_later() -> None:
    store = FullForHistory()
    clock = FakeClock(T0)
    registry = ActorRegistry(store, clock=clock)
    actor = registry.actor("key_a")
    actor.record_nowait(200, clock(), ALLOWED)
    await registry.flush([actor])  # the history does not fit: the counters still do
    with store.read() as txn:
        assert read_range(txn, b"key_a", "minute", 0, 2**32 - 1) == []
    assert actor.dirty and actor.snapshot().requests == 1
    store.full = False
    actor.record_nowait(429, clock() + 61, RATE_LIMITED)
    await registry.flush([actor])
    with store.read() as txn:
        got = read_range(txn, b"key_a", "minute", 0, 2**32 - 1)
        usage = msgspec.msgpack.decode(txn.get(Table.USAGE, b"key_a") or b"")
    assert got == [
        (T0 // 60, [1, 0, 0, 0, 0, 0, 1, 0, 0, 0]),
        (T0 // 60 + 1, [0, 1, 0, 0, 0, 0, 0, 0, 1, 0]),
    ]
    assert usage[0] == 2  # requests: each counted once


# ---- a gateway in-process, on a hand-moved clock ------------------------------------------


async def _history(h: Any, admin: dict[str, str], path: str, **params: str) -> dict[str, Any]:
    r = await h.admin.get(path, params=params, headers=admin)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


async def test_the_history_of_a_gateway_matches_what_was_sent(tmp_path: Path) -> None:
    clock = FakeClock(T0 + 10 * 3600 + 59 * 60 + 58)  # two seconds before 11:00
    bad = [FakeResponse(502) for _ in range(2)]
    upstream = FakeUpstream(script=bad)
    async with open_harness(
        tmp_path / "data", upstream=upstream, plugins={"key-auth": {}}, clock=clock
    ) as h:
        admin = await setup_admin(h)
        r = await h.admin.post(
            "/keys",
            json={
                "name": "k",
                "owner": "o",
                "rate_limits": [{"name": "m", "limit": 6, "period_seconds": 3600}],
                "credits": {"remaining": 5},
            },
            headers=admin,
        )
        key_id, key = r.json()["id"], r.json()["key"]
        sent: list[int] = []
        for _ in range(2):  # the scripted 502s: upstream errors (10:59)
            sent.append((await h.client.get("/x", headers=bearer(key))).status_code)
        clock.advance(2)  # exactly 11:00:00
        for _ in range(5):  # 3 allowed, then 2 refused for credits
            sent.append((await h.client.get("/x", headers=bearer(key))).status_code)
        assert sent == [502, 502, 200, 200, 200, 429, 429]
        r = await h.admin.delete(f"/keys/{key_id}", headers=admin)
        assert r.status_code == 200, r.text
        for _ in range(3):  # a revoked key: invalid
            assert (await h.client.get("/x", headers=bearer(key))).status_code == 401
        await h.server.gateway.actors.flush(list(h.server.gateway.actors.actors.values()))
        path = f"/keys/{key_id}/usage/history"
        window_ = {"from": at(T0 + 10 * 3600), "to": at(T0 + 12 * 3600)}
        hours = await _history(h, admin, path, granularity="hour", **window_)
        assert [(i["start"][11:16], i["total"]) for i in hours["items"]] == [
            ("10:00", 2),
            ("11:00", 8),
        ]
        ten, eleven = hours["items"]
        assert (ten["upstream_error"], ten["by_status_class"]["5xx"]) == (2, 2)
        assert (eleven["allowed"], eleven["quota_exceeded"], eleven["invalid"]) == (3, 2, 3)
        assert eleven["rate_limited"] == 0 and eleven["by_status_class"]["4xx"] == 5
        minutes = await _history(h, admin, path, granularity="minute", **window_)
        assert [i["start"][11:16] for i in minutes["items"]] == ["10:59", "11:00"]
        days = await _history(h, admin, path, granularity="day", **window_)
        assert [i["total"] for i in days["items"]] == [10]
        # Bad input: 400 naming the field, 404 for an unknown key.
        for params, field in (
            ({"granularity": "week"}, "granularity"),
            ({"from": window_["to"], "to": window_["from"]}, "from"),
            ({"granularity": "minute", "from": at(T0), "to": at(T0 + 2 * DAY)}, "from"),
            ({"from": "yesterday"}, "from"),
            ({"from": "2026-01-01T00:00:00"}, "from"),  # no offset
        ):
            r = await h.admin.get(path, params=params, headers=admin)
            assert r.status_code == 400, (params, r.text)
            assert r.json()["errors"][0]["path"] == field, r.text
        r = await h.admin.get("/keys/key_01HZZZZZZZZZZZZZZZZZZZZZZZ/usage/history", headers=admin)
        assert r.status_code == 404, r.text
    await trio.lowlevel.checkpoint()


# ---- the storage cost (benchmarks/history_storage.py) ----------------------------------


async def test_the_storage_cost_measure_counts_every_bucket(tmp_path: Path) -> None:
    """The measure of ``python -m benchmarks history`` on two hours of two
    keys: every minute, hour and day bucket is there, in real LMDB pages."""
    cost = await measure(tmp_path / "store", keys=2, minutes=120)
    assert cost.entries == 2 * (120 + 2 + 1)
    assert cost.payload_bytes == cost.entries * 47  # 36-byte key, 11-byte value
    assert cost.table_bytes >= cost.payload_bytes
    assert "LMDB bytes per key-day" in "\n".join(cost.lines())
