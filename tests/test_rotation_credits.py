"""Rotation through the real gateway (real listener, real LMDB, real HTTP):
during the grace period the old and the new key spend one credit balance
and one limiter state, exactly, with nothing lost or doubled at the moment
of rotation (contract §5); after the grace the old key is ``KEY_ROTATED``.

Every rotation here happens at once after the spending, before any flush:
the bug this guards against handed the new key the last *flushed* balance
(spend 100, rotate within a second, get 100 more) and a fresh limiter.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers_gateway import create_key
from triogate.testing import Harness, open_harness

HOURLY_10 = [{"name": "hourly", "limit": 10, "period_seconds": 3600}]


@asynccontextmanager
async def gateway(
    tmp_path: Path, plugins: dict[str, Any]
) -> AsyncIterator[tuple[Harness, dict[str, str]]]:
    async with open_harness(tmp_path / "data", plugins=plugins) as h:
        r = await h.admin.post("/setup", json={"name": "root", "email": "root@example.com"})
        assert r.status_code == 201, r.text
        yield h, {"Authorization": f"Bearer {r.json()['key']}"}


async def rotate(h: Harness, admin: dict[str, str], key_id: str) -> dict[str, Any]:
    r = await h.admin.post(f"/keys/{key_id}/rotate", json={"grace_seconds": 3600}, headers=admin)
    assert r.status_code == 200, r.text
    new: dict[str, Any] = r.json()["new"]
    assert new["rotated_from"] == key_id
    return new


async def call(h: Harness, key: str) -> httpx.Response:
    return await h.client.get("/x", headers={"x-api-key": key})


async def statuses(h: Harness, keys: list[str]) -> list[tuple[int, str | None]]:
    out = []
    for key in keys:
        r = await call(h, key)
        out.append((r.status_code, r.json().get("code") if r.status_code != 200 else None))
    return out


async def admin_get(h: Harness, admin: dict[str, str], path: str) -> dict[str, Any]:
    r = await h.admin.get(path, headers=admin)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


async def test_credits_are_one_balance_across_a_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with gateway(tmp_path, {"key-auth": {}}) as (h, admin):
        a_id, a_key = await create_key(h, admin, credits={"remaining": 200})
        assert {s for s, _ in await statuses(h, [a_key] * 100)} == {200}
        new = await rotate(h, admin, a_id)  # at once: nothing flushed yet
        b_id, b_key = new["id"], new["key"]
        # The new key has exactly what is left, and both records show the
        # one live balance (not the last flush, not a copy).
        assert new["credits"]["remaining"] == 100
        for key_id in (a_id, b_id):
            assert (await admin_get(h, admin, f"/keys/{key_id}"))["credits"]["remaining"] == 100
            assert (await admin_get(h, admin, f"/keys/{key_id}/usage"))["credits_remaining"] == 100
        # The old key, in its grace, spends from the same balance as the new.
        assert await statuses(h, [a_key] * 30) == [(200, None)] * 30
        assert await statuses(h, [b_key] * 70) == [(200, None)] * 70
        assert await statuses(h, [a_key, b_key]) == [(429, "QUOTA_EXCEEDED")] * 2
        # A PATCH of the credits on either key sets the shared balance.
        r = await h.admin.patch(f"/keys/{a_id}", json={"credits": {"remaining": 3}}, headers=admin)
        assert r.status_code == 200, r.text
        assert (await admin_get(h, admin, f"/keys/{b_id}"))["credits"]["remaining"] == 3
        assert await statuses(h, [b_key, a_key, b_key, a_key]) == [(200, None)] * 3 + [
            (429, "QUOTA_EXCEEDED")
        ]
        # Usage stays per key: each key reports its own requests.
        gw = h.server.gateway
        assert gw is not None
        await gw.actors.flush(list(gw.actors.actors.values()))
        a_usage = await admin_get(h, admin, f"/keys/{a_id}/usage")
        b_usage = await admin_get(h, admin, f"/keys/{b_id}/usage")
        assert (a_usage["requests"], a_usage["by_status_class"]["4xx"]) == (100 + 30 + 1 + 2, 2)
        assert (b_usage["requests"], b_usage["by_status_class"]["4xx"]) == (70 + 1 + 2, 1)
        assert a_usage["credits_remaining"] == b_usage["credits_remaining"] == 0
        # After the grace the old key is refused as rotated; the new one
        # goes on (its refusal here is the empty balance, not the key).
        later = time.time() + 3601
        monkeypatch.setattr(gw.keys, "_clock", lambda: later)
        assert await statuses(h, [a_key, b_key]) == [(401, "KEY_ROTATED"), (429, "QUOTA_EXCEEDED")]


async def test_an_exhausted_limit_stays_exhausted_for_the_new_key(tmp_path: Path) -> None:
    async with gateway(tmp_path, {"key-auth": {}}) as (h, admin):
        a_id, a_key = await create_key(h, admin, rate_limits=HOURLY_10)
        assert await statuses(h, [a_key] * 11) == [(200, None)] * 10 + [(429, "RATE_LIMITED")]
        new = await rotate(h, admin, a_id)
        assert await statuses(h, [new["key"], a_key]) == [(429, "RATE_LIMITED")] * 2


async def test_alternating_old_and_new_keys_are_limited_together(tmp_path: Path) -> None:
    async with gateway(tmp_path, {"key-auth": {}}) as (h, admin):
        a_id, a_key = await create_key(h, admin, rate_limits=HOURLY_10)
        assert await statuses(h, [a_key] * 4) == [(200, None)] * 4
        b_key = (await rotate(h, admin, a_id))["key"]
        assert (
            await statuses(h, [a_key, b_key] * 5) == [(200, None)] * 6 + [(429, "RATE_LIMITED")] * 4
        )


async def test_a_route_limit_by_key_counts_the_rotation_as_one_key(tmp_path: Path) -> None:
    plugins = {"key-auth": {}, "rate-limit": {"limit": 5, "period_seconds": 3600, "by": "key"}}
    async with gateway(tmp_path, plugins) as (h, admin):
        a_id, a_key = await create_key(h, admin)
        assert await statuses(h, [a_key] * 3) == [(200, None)] * 3
        b_key = (await rotate(h, admin, a_id))["key"]
        assert (
            await statuses(h, [b_key, a_key] * 2) == [(200, None)] * 2 + [(429, "RATE_LIMITED")] * 2
        )


async def test_a_second_rotation_keeps_the_one_balance(tmp_path: Path) -> None:
    async with gateway(tmp_path, {"key-auth": {}}) as (h, admin):
        a_id, a_key = await create_key(h, admin, credits={"remaining": 10})
        assert await statuses(h, [a_key] * 2) == [(200, None)] * 2
        b = await rotate(h, admin, a_id)
        assert await statuses(h, [b["key"]] * 3) == [(200, None)] * 3
        c = await rotate(h, admin, b["id"])
        assert c["credits"]["remaining"] == 5
        keys = [a_key, b["key"], c["key"]] * 2
        assert await statuses(h, keys) == [(200, None)] * 5 + [(429, "QUOTA_EXCEEDED")]
