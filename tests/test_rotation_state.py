"""Rotation shares state, in units: the key service over the in-memory store
with a hand-moved clock, and the key-auth plugin driving the real actors.

A rotation copies the old key's *state key* (the first key of its chain) to
the new one, so both are admitted in one actor: one balance, one limiter
state. Covered: what rotate writes (and no longer moves), chains, the live
balance in views, PATCH on any key of a chain, per-key usage counters,
cleanup keeping a purged first key's state for its successors, a restart
(a fresh registry) continuing the one balance, keys rotated before state
keys existed, and several workers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import pytest

from tests.conftest import FakeClock
from triogate.control.audit import Actor
from triogate.control.keychain import chain
from triogate.control.models import CreatedKey, CreateKeyRequest, RotateKeyRequest, UpdateKeyRequest
from triogate.dataplane.plugin_services import plugin_env
from triogate.errors import GatewayError
from triogate.http import Body, Headers, Request, Response
from triogate.plugins.contract import Context
from triogate.plugins.key_auth import KeyAuth
from triogate.runtime.gateway import Gateway
from triogate.storage import KeyRecord, Table, WriteTxn, codec

ACTOR = Actor("adm_test", "127.0.0.1")
GRACE = 60


def create_req(**kw: object) -> CreateKeyRequest:
    return msgspec.convert({"name": "svc", "owner": "alice", "scopes": [], **kw}, CreateKeyRequest)


def patch(**kw: object) -> UpdateKeyRequest:
    return msgspec.convert(kw, UpdateKeyRequest)


def record(gw: Gateway, key_id: str) -> KeyRecord:
    with gw.store.read() as txn:
        raw = txn.get(Table.KEYS, key_id.encode())
    assert raw is not None
    return codec.key.decode(raw)


async def rotate(gw: Gateway, key_id: str) -> CreatedKey:
    return (await gw.keys.rotate(key_id, RotateKeyRequest(grace_seconds=GRACE), ACTOR)).new


class Proxy:
    """key-auth's access and log phases, as the pipeline runs them for one
    request (the upstream answers 200), over the gateway's own actors."""

    def __init__(self, gw: Gateway) -> None:
        env = plugin_env(keys=gw.keys, actors=gw.actors, clock=gw.clock)
        self.plugin = KeyAuth(KeyAuth.Config(), env)

    async def call(self, key: str) -> int | str:
        async def nothing() -> AsyncIterator[bytes]:
            return
            yield b""

        request = Request(
            method="GET",
            path="/x",
            query="",
            headers=Headers.of([("x-api-key", key)]),
            body=Body(nothing(), 0),
            client_ip="127.0.0.1",
        )
        ctx = Context(request, request_id="r", started_at=0.0)
        try:
            await self.plugin.access(ctx)
        except GatewayError as exc:
            await self.plugin.log(ctx, Response(exc.status))  # refusals count too
            return exc.code
        await self.plugin.log(ctx, Response(200))
        return 200

    async def calls(self, keys: list[str]) -> list[int | str]:
        return [await self.call(key) for key in keys]


async def test_rotate_moves_nothing_and_the_chain_keeps_one_state_key(
    memory_gateway: Gateway,
) -> None:
    gw = memory_gateway
    a = await gw.keys.create(create_req(credits={"remaining": 7}), ACTOR)
    b = await rotate(gw, a.id)
    c = await rotate(gw, b.id)
    ra, rb, rc = record(gw, a.id), record(gw, b.id), record(gw, c.id)
    assert ra.state_id is None and ra.state_key == a.id  # a first key: its own
    assert rb.state_id == rc.state_id == a.id
    # The old key keeps its credits (nothing moved to zero), and the new ones
    # share its version and refill schedule, so no actor resets the balance.
    assert ra.credits == rb.credits == rc.credits and ra.credits is not None
    assert ra.credits.remaining == 7
    assert ra.credits_version == rb.credits_version == rc.credits_version == 0
    assert ra.credits_set_at == rb.credits_set_at == rc.credits_set_at
    with gw.store.read() as txn:
        assert [r.id for r in chain(txn, rb)] == [b.id, a.id, c.id]


async def test_both_keys_spend_one_balance_and_views_show_it_live(
    memory_gateway: Gateway,
) -> None:
    gw = memory_gateway
    proxy = Proxy(gw)
    a = await gw.keys.create(create_req(credits={"remaining": 10}), ACTOR)
    assert await proxy.calls([a.key] * 4) == [200] * 4
    b = await rotate(gw, a.id)  # nothing flushed: the balance is in the actor
    assert b.credits is not None and b.credits.remaining == 6
    assert await proxy.calls([a.key, b.key] * 3) == [200] * 6
    assert await proxy.calls([b.key, a.key]) == ["QUOTA_EXCEEDED"] * 2
    for key_id in (a.id, b.id):
        view = gw.keys.get(key_id)
        assert view.credits is not None and view.credits.remaining == 0
    # Each key counts its own requests; the balance is the one shared.
    await gw.actors.flush(list(gw.actors.actors.values()))
    a_usage, b_usage = gw.keys.usage(a.id), gw.keys.usage(b.id)
    assert (a_usage.requests, b_usage.requests) == (4 + 3 + 1, 3 + 1)
    assert a_usage.credits_remaining == b_usage.credits_remaining == 0
    with gw.store.read() as txn:
        stored_b = codec.usage.decode(txn.get(Table.USAGE, b.id.encode()) or b"")
    assert stored_b.credits_remaining is None and stored_b.limiters == {}


async def test_an_exhausted_limit_is_shared_and_restored_after_a_restart(
    memory_gateway: Gateway,
) -> None:
    gw = memory_gateway
    limits = [{"name": "hourly", "limit": 3, "period_seconds": 3600}]
    a = await gw.keys.create(create_req(rate_limits=limits, credits={"remaining": 50}), ACTOR)
    assert await Proxy(gw).calls([a.key] * 2) == [200] * 2
    b = await rotate(gw, a.id)
    assert await Proxy(gw).calls([b.key, a.key]) == [200, "RATE_LIMITED"]
    # A restart: the state is flushed, the actors are gone, a new registry
    # loads the one state for both keys.
    await gw.actors.flush(list(gw.actors.actors.values()))
    gw.actors.actors.clear()
    assert await Proxy(gw).calls([b.key, a.key]) == ["RATE_LIMITED"] * 2
    view = gw.keys.get(b.id)
    assert view.credits is not None and view.credits.remaining == 47


async def test_patch_on_any_key_of_the_chain_sets_the_shared_settings(
    memory_gateway: Gateway,
) -> None:
    gw = memory_gateway
    proxy = Proxy(gw)
    a = await gw.keys.create(create_req(credits={"remaining": 5}), ACTOR)
    b = await rotate(gw, a.id)
    c = await rotate(gw, b.id)
    assert await proxy.calls([c.key]) == [200]
    await gw.keys.update(a.id, patch(credits={"remaining": 2}), ACTOR)
    versions = {record(gw, k).credits_version for k in (a.id, b.id, c.id)}
    assert versions == {1}
    for key_id in (a.id, b.id, c.id):
        view = gw.keys.get(key_id)
        assert view.credits is not None and view.credits.remaining == 2
    assert await proxy.calls([b.key, c.key, a.key]) == [200, 200, "QUOTA_EXCEEDED"]
    limits = [{"name": "minute", "limit": 1, "period_seconds": 60}]
    await gw.keys.update(c.id, patch(rate_limits=limits, credits={"remaining": 9}), ACTOR)
    assert {record(gw, k).rate_limits[0].limit for k in (a.id, b.id, c.id)} == {1}
    assert await proxy.calls([a.key, c.key]) == [200, "RATE_LIMITED"]
    # Fields that are the key's own stay its own.
    await gw.keys.update(b.id, patch(name="renamed"), ACTOR)
    assert [gw.keys.get(k).name for k in (a.id, b.id, c.id)] == ["svc", "renamed", "svc"]
    updates = gw.audit.list(limit=10, action="key.update").items  # newest first
    assert [(e.target_id, e.details.get("shared_with")) for e in updates] == [
        (b.id, None),
        (c.id, [b.id, a.id]),
        (a.id, [b.id, c.id]),
    ]


async def test_cleanup_keeps_a_purged_first_keys_state_for_its_successor(
    memory_gateway: Gateway, clock: FakeClock
) -> None:
    gw = memory_gateway
    a = await gw.keys.create(create_req(credits={"remaining": 5}), ACTOR)
    assert await Proxy(gw).calls([a.key] * 2) == [200] * 2
    b = await rotate(gw, a.id)
    await gw.actors.flush(list(gw.actors.actors.values()))
    gw.actors.actors.clear()
    clock.advance(GRACE)
    assert await Proxy(gw).calls([a.key]) == ["KEY_ROTATED"]
    assert await gw.keys.cleanup(ACTOR) == (0, 1)
    with gw.store.read() as txn:
        assert txn.get(Table.KEYS, a.id.encode()) is None
        assert txn.get(Table.USAGE, a.id.encode()) is not None  # b's balance
    assert await Proxy(gw).calls([b.key] * 4) == [200] * 3 + ["QUOTA_EXCEEDED"]
    # The chain now starts at b: a PATCH on it still reaches the state.
    await gw.keys.update(b.id, patch(credits={"remaining": 1}), ACTOR)
    assert await Proxy(gw).calls([b.key] * 2) == [200, "QUOTA_EXCEEDED"]
    # A purged middle key's usage (its own counters only) goes with it.
    c = await rotate(gw, b.id)
    await gw.actors.flush(list(gw.actors.actors.values()))
    clock.advance(GRACE)
    assert await gw.keys.cleanup(ACTOR) == (0, 1)
    with gw.store.read() as txn:
        assert txn.get(Table.USAGE, b.id.encode()) is None
        assert txn.get(Table.USAGE, a.id.encode()) is not None  # c's balance
    await gw.keys.update(c.id, patch(credits={"remaining": 2}), ACTOR)
    assert await Proxy(gw).calls([c.key] * 3) == [200, 200, "QUOTA_EXCEEDED"]


async def test_keys_rotated_before_state_keys_keep_their_own_state(
    memory_gateway: Gateway,
) -> None:
    """A pair rotated by the old code: the new key holds its own (moved)
    balance, with no state id; nothing about it changes meaning."""
    gw = memory_gateway
    a = await gw.keys.create(create_req(credits={"remaining": 0}), ACTOR)
    b = await gw.keys.create(create_req(credits={"remaining": 3}), ACTOR)
    ra = msgspec.structs.replace(
        record(gw, a.id), status="rotated", rotated_to=b.id, grace_ends_at=gw.clock() + GRACE
    )
    rb = msgspec.structs.replace(record(gw, b.id), rotated_from=a.id)

    def write(txn: WriteTxn) -> None:
        for r in (ra, rb):
            txn.put(Table.KEYS, r.id.encode(), codec.encode(r))

    await gw.store.write(write)
    with gw.store.read() as txn:
        assert [r.id for r in chain(txn, rb)] == [b.id]
    assert await Proxy(gw).calls([a.key, b.key, b.key, b.key, b.key]) == [
        "QUOTA_EXCEEDED",
        200,
        200,
        200,
        "QUOTA_EXCEEDED",
    ]
    await gw.keys.update(b.id, patch(credits={"remaining": 1}), ACTOR)
    assert record(gw, a.id).credits_version == 0  # not part of b's state


@pytest.mark.parametrize("workers", [1, 2])
async def test_views_show_the_live_balance_only_where_it_is_exact(
    memory_gateway: Gateway, workers: int
) -> None:
    gw = memory_gateway
    gw.actors.set_worker(0, workers)
    a = await gw.keys.create(create_req(credits={"remaining": 10}), ACTOR)
    assert await Proxy(gw).calls([a.key] * 3) == [200] * 3
    b = await rotate(gw, a.id)
    assert b.credits is not None
    # One worker: the actor's balance is the balance. Several: each knows
    # only its own spending, so the views show the stored one (set, or as
    # last flushed) and the flush reconciles.
    assert b.credits.remaining == (7 if workers == 1 else 10)
    await gw.actors.flush(list(gw.actors.actors.values()))
    view = gw.keys.get(b.id)
    assert view.credits is not None and view.credits.remaining == 7
