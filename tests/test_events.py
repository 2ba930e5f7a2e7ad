"""Events and webhooks without I/O: signatures, the back-off schedule, the
``credits.low`` levels, the outbox written in the key change's own
transaction, the data-plane events' batch (deduplicated across workers),
and a delivery's state machine. The real deliveries are
``test_events_process.py``'s."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.conftest import FakeClock, make_secrets
from triogate.config import Config, EventsConfig, parse_config
from triogate.control.audit import Actor
from triogate.control.models import CreateKeyRequest, RotateKeyRequest, UpdateKeyRequest
from triogate.errors import ConfigError, ValidationError
from triogate.events import Outbox, signature_header, verify_signature
from triogate.events.live import LiveEvents, credit_levels
from triogate.events.outbox import delivery_decoder, due_of, record_attempt, retry_delay
from triogate.runtime.gateway import Gateway
from triogate.storage import Credits, MemoryStore, Store, Table
from triogate.storage.records import DeliveryAttempt, DeliveryRecord

SECRET = "0123456789abcdef0123456789abcdef"
ACTOR = Actor("test")
ALL = [
    "key.created",
    "key.updated",
    "key.revoked",
    "key.rotated",
    "key.expired",
    "key.disabled",
    "credits.low",
    "rate_limit.exceeded",
]


def _config(tmp_path: Path, events: list[str] = ALL, **settings: Any) -> Config:
    raw = {
        "server": {"data_dir": str(tmp_path)},
        "events": {
            "webhooks": [
                {"name": "a", "url": "http://127.0.0.1:9/a", "events": events, "secret": SECRET},
                {"name": "b", "url": "https://example.com/b", "events": ["key.created"],
                 "secret": SECRET},
            ],
            **settings,
        },
    }  # fmt: skip
    return parse_config(raw, environ={})


def _deliveries(store: Store) -> list[DeliveryRecord]:
    with store.read() as txn:
        return [delivery_decoder.decode(v) for _, v in txn.scan(Table.EVENT_DELIVERIES)]


def _outbox(store: Store) -> list[tuple[float, str]]:
    with store.read() as txn:
        return [(due_of(k), k[8:].decode()) for k, _ in txn.scan(Table.EVENT_OUTBOX)]


def _types(store: Store, webhook: str = "a") -> list[str]:
    return [d.event_type for d in _deliveries(store) if d.webhook == webhook]


# ---- signatures ------------------------------------------------------------------


def test_a_signature_verifies_with_its_secret_body_and_time_only() -> None:
    body = b'{"id":"evt_1"}'
    header = signature_header(SECRET, 1_800_000_000, body)
    assert header.startswith("t=1800000000,v1=")
    assert verify_signature(SECRET, header, body, 1_800_000_100)
    assert not verify_signature(SECRET + "x", header, body, 1_800_000_100)
    assert not verify_signature(SECRET, header, body + b" ", 1_800_000_100)
    # Outside the tolerance (a replay), either way.
    assert not verify_signature(SECRET, header, body, 1_800_000_301)
    assert not verify_signature(SECRET, header, body, 1_799_999_699)
    # Several v1 entries: one matching is enough; garbage is refused.
    assert verify_signature(SECRET, "v1=00," + header, body, 1_800_000_000)
    for bad in ("", "t=x,v1=00", "v1=" + header.split("v1=")[1], "t=1800000000"):
        assert not verify_signature(SECRET, bad, body, 1_800_000_000)


# ---- the schedule -------------------------------------------------------------------


def test_back_off_doubles_up_to_the_cap_with_bounded_jitter() -> None:
    config = EventsConfig()
    low = [retry_delay(n, config, lambda: 0.0) for n in range(1, config.max_attempts)]
    high = [retry_delay(n, config, lambda: 1.0) for n in range(1, config.max_attempts)]
    assert low[0] == pytest.approx(24.0) and high[0] == pytest.approx(36.0)
    assert low[1] == pytest.approx(48.0)
    assert max(high) == pytest.approx(config.retry_max_seconds * 1.2)
    # The default schedule spans about a day (Stripe-like), jitter aside.
    middle = sum(retry_delay(n, config, lambda: 0.5) for n in range(1, config.max_attempts))
    assert 20 * 3600 < middle < 28 * 3600


def test_credit_levels_are_relative_to_the_refill_amount_else_the_balance_set() -> None:
    assert credit_levels(Credits(remaining=1000), (20, 0)) == (200, ((20, 200), (0, 0)))
    refilled = Credits(remaining=5, refill_amount=50, refill_interval_seconds=60)
    assert credit_levels(refilled, (20, 0)) == (10, ((20, 10), (0, 0)))
    own = Credits(remaining=100, low_at_percent=(50, 10))
    assert credit_levels(own, (20, 0)) == (50, ((50, 50), (10, 10)))
    assert credit_levels(Credits(remaining=100, low_at_percent=()), (20, 0))[0] == -1


# ---- control-plane events: in the change's own transaction ---------------------------------


async def test_key_changes_write_their_events_in_the_same_write(
    tmp_path: Path, clock: FakeClock
) -> None:
    gw = Gateway(_config(tmp_path), MemoryStore(), make_secrets(), clock=clock)
    created = await gw.keys.create(
        CreateKeyRequest(name="k", owner="secret-owner", expires_at=None), ACTOR
    )
    assert _types(gw.store) == ["key.created"]
    assert _types(gw.store, "b") == ["key.created"]
    # One event, one delivery per webhook, the same body.
    a, b = sorted(_deliveries(gw.store), key=lambda d: d.webhook)
    assert a.event_id == b.event_id and a.payload == b.payload and a.id != b.id
    event = msgspec.json.decode(a.payload)
    assert event["type"] == "key.created" and event["data"]["key_id"] == created.id
    assert created.key.encode() not in a.payload and b"secret-owner" not in a.payload
    assert len(_outbox(gw.store)) == 2

    await gw.keys.update(created.id, UpdateKeyRequest(enabled=False), ACTOR)
    assert _types(gw.store)[-2:] == ["key.updated", "key.disabled"]
    updated = msgspec.json.decode(_deliveries(gw.store)[-2].payload)
    assert updated["data"]["fields"] == ["enabled"] and updated["data"]["enabled"] is False

    # A refused change writes no event (the write is rolled back whole).
    count = len(_deliveries(gw.store))
    with pytest.raises(ValidationError):
        await gw.keys.update(created.id, UpdateKeyRequest(plan_id="pln_nope"), ACTOR)
    assert len(_deliveries(gw.store)) == count

    await gw.keys.update(created.id, UpdateKeyRequest(enabled=True), ACTOR)
    rotated = await gw.keys.rotate(created.id, RotateKeyRequest(grace_seconds=60), ACTOR)
    rotation = msgspec.json.decode(_deliveries(gw.store)[-1].payload)
    assert rotation["type"] == "key.rotated"
    assert rotation["data"]["new_key_id"] == rotated.new.id
    assert _types(gw.store)[-2:] == ["key.updated", "key.rotated"]  # one event, not two
    await gw.keys.revoke(rotated.new.id, ACTOR)
    assert _types(gw.store)[-1] == "key.revoked"


async def test_the_cleanup_emits_key_expired_once(tmp_path: Path, clock: FakeClock) -> None:
    gw = Gateway(_config(tmp_path), MemoryStore(), make_secrets(), clock=clock)
    at = datetime.fromtimestamp(clock.now + 10, UTC)
    key = await gw.keys.create(CreateKeyRequest(name="k", owner="o", expires_at=at), ACTOR)
    clock.advance(11)
    assert await gw.keys.cleanup(ACTOR) == (1, 0)
    assert await gw.keys.cleanup(ACTOR) == (0, 0)
    expired = [d for d in _deliveries(gw.store) if d.event_type == "key.expired"]
    assert [d.key_id for d in expired] == [key.id]


async def test_without_webhooks_nothing_is_written(tmp_path: Path, clock: FakeClock) -> None:
    config = parse_config({"server": {"data_dir": str(tmp_path)}}, environ={})
    gw = Gateway(config, MemoryStore(), make_secrets(), clock=clock)
    assert gw.keys.events is None and gw.events.live is None
    await gw.keys.create(CreateKeyRequest(name="k", owner="o"), ACTOR)
    assert _deliveries(gw.store) == [] and _outbox(gw.store) == []


# ---- data-plane events ---------------------------------------------------------------------


async def test_credits_low_fires_once_per_level_crossed(tmp_path: Path, clock: FakeClock) -> None:
    config = _config(tmp_path)
    store = MemoryStore()
    live = LiveEvents(Outbox(config.events.webhooks), config.events, store, clock)
    spec = Credits(remaining=10)
    for balance in range(9, -1, -1):  # ten requests of one credit
        live.spent("key_A", spec, balance, 1)
    refilled = Credits(remaining=0, refill_amount=100, refill_interval_seconds=60)
    live.spent("key_B", refilled, 5, 30, identity_id="idn_X")  # 35 -> 5: past 20%
    assert await live.flush() == 3
    low = [msgspec.json.decode(d.payload)["data"] for d in _deliveries(store)]
    assert [(d["key_id"], d["threshold_percent"], d["remaining"]) for d in low] == [
        ("key_A", 20, 2),
        ("key_A", 0, 0),
        ("key_B", 20, 5),
    ]
    assert low[2]["identity_id"] == "idn_X" and low[2]["balance_of"] == "identity"
    assert await live.flush() == 0


async def test_rate_limit_exceeded_once_per_key_per_minute_across_workers(
    tmp_path: Path, clock: FakeClock
) -> None:
    config = _config(tmp_path)
    store = MemoryStore()
    outbox = Outbox(config.events.webhooks)
    # Two workers: their own memories, one shared outbox.
    one = LiveEvents(outbox, config.events, store, clock)
    two = LiveEvents(outbox, config.events, store, clock)
    for _ in range(5):
        one.rate_limited("key_A")
        two.rate_limited("key_A")
    one.rate_limited("key_B")
    assert await one.flush() == 2
    assert await two.flush() == 0  # worker one told it this minute
    clock.advance(61)
    two.rate_limited("key_A")
    assert await two.flush() == 1
    assert [d.key_id for d in _deliveries(store)] == ["key_A", "key_B", "key_A"]


async def test_key_expired_from_the_data_plane_once(tmp_path: Path, clock: FakeClock) -> None:
    gw = Gateway(_config(tmp_path), MemoryStore(), make_secrets(), clock=clock)
    at = datetime.fromtimestamp(clock.now + 5, UTC)
    key = await gw.keys.create(CreateKeyRequest(name="k", owner="o", expires_at=at), ACTOR)
    clock.advance(6)
    live = gw.events.live
    assert live is not None
    live.expired(key.id)
    live.expired(key.id)
    assert await live.flush() == 1
    assert gw.keys.get(key.id).status == "expired"
    # A second process (or a restart) sees it marked: no second event.
    other = LiveEvents(gw.events.outbox, gw.events.config, gw.store, clock)
    other.expired(key.id)
    assert await other.flush() == 0
    assert await gw.keys.cleanup(ACTOR) == (0, 0)
    assert [d.key_id for d in _deliveries(gw.store) if d.event_type == "key.expired"] == [key.id]


# ---- a delivery's state machine ------------------------------------------------------------------


async def test_attempts_retry_then_fail_or_deliver(tmp_path: Path, clock: FakeClock) -> None:
    config = _config(tmp_path, ["key.created"], max_attempts=3)
    store = MemoryStore()
    outbox = Outbox(config.events.webhooks)
    await store.write(lambda txn: outbox.emit(txn, "key.created", {"key_id": "k"}, clock.now))
    first, second = _deliveries(store)

    def attempt(delivery_id: str, error: str | None) -> Any:
        done = DeliveryAttempt(clock.now, 500 if error else 204, error)
        return store.write(
            lambda txn: record_attempt(txn, delivery_id, done, config.events, lambda: 0.5)
        )

    r = await attempt(first.id, "HTTP 500")
    assert r.status == "pending" and r.tries == 1
    assert r.next_attempt_at == pytest.approx(clock.now + config.events.retry_base_seconds)
    assert (r.next_attempt_at, first.id) in [(pytest.approx(t), i) for t, i in _outbox(store)]
    await attempt(first.id, "HTTP 500")
    r = await attempt(first.id, "HTTP 500")
    assert r.status == "failed" and r.next_attempt_at is None and len(r.attempts) == 3
    assert await attempt(first.id, None) is None  # done: no more attempts
    r = await attempt(second.id, None)
    assert r.status == "delivered" and r.attempts[-1].status == 204
    assert _outbox(store) == []


def test_webhook_config_errors_have_paths(tmp_path: Path) -> None:
    hook = {"url": "http://127.0.0.1:9/a", "events": ["key.created"], "secret": SECRET}
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {"events": {"webhooks": [hook, hook], "retry_base_seconds": 10,
                        "retry_max_seconds": 5}},
            environ={},
        )  # fmt: skip
    paths = {e.path for e in caught.value.errors}
    assert paths == {"events.webhooks[1].name", "events.retry_max_seconds"}
    with pytest.raises(ConfigError) as caught:
        parse_config({"events": {"webhooks": [{**hook, "secret": "short"}]}}, environ={})
    assert [e.path for e in caught.value.errors] == ["events.webhooks[0].secret"]
    # The secret from the environment, by the webhook's place in the list.
    config = parse_config(
        {"events": {"webhooks": [{**hook, "secret": "short"}]}},
        environ={"TRIOGATE_EVENTS__WEBHOOKS__0__SECRET": "e" * 40},
    )
    assert config.events.webhooks[0].secret == "e" * 40
    many = {"events": {"webhooks": [{**hook, "name": f"h{i}"} for i in range(17)]}}
    with pytest.raises(ConfigError):
        parse_config(many, environ={})
