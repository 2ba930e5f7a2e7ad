"""Credit operations, calendar refills and validate's limit state through the
real listener (``open_harness``) on a virtual clock: a monthly refill, the
state validate reports against the next request's headers, ``spend``,
``X-Credits-Remaining``, identities' pools, the audit, and bad input."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import FakeClock
from tests.helpers_gateway import assert_problem, bearer, create_key, setup_admin
from triogate.testing import FakeUpstream, Harness, open_harness

KEY_AUTH: dict[str, dict[str, Any]] = {"key-auth": {}}
MINUTE_10 = {"name": "minute", "limit": 10, "period_seconds": 60}


def t(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc]


async def op(h: Harness, admin: dict[str, str], path: str, body: Any) -> httpx.Response:
    return await h.admin.post(path, json=body, headers=admin)


async def validate(h: Harness, admin: dict[str, str], key: str, **extra: Any) -> dict[str, Any]:
    r = await h.admin.post("/keys/validate", json={"key": key, **extra}, headers=admin)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


async def test_monthly_refill_on_a_virtual_clock(tmp_path: Path) -> None:
    clock = FakeClock(t(2028, 1, 20, 12))
    async with open_harness(tmp_path, plugins=KEY_AUTH, clock=clock) as h:
        admin = await setup_admin(h)
        credits = {
            "remaining": 3,
            "refill_amount": 5,
            "refill_interval": "monthly",
            "refill_day": 28,
        }
        _, key = await create_key(h, admin, credits=credits)
        statuses = [(await h.client.get("/x", headers=bearer(key))).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        refused = await h.client.get("/x", headers=bearer(key))
        assert_problem(refused, 429, "QUOTA_EXCEEDED")
        assert refused.headers["x-credits-remaining"] == "0"
        # Retry-After: until 00:00 UTC on the 28th.
        assert int(refused.headers["retry-after"]) == int(t(2028, 1, 28) - clock.now)
        clock.now = t(2028, 1, 27, 23, 59, 59)
        assert (await h.client.get("/x", headers=bearer(key))).status_code == 429
        clock.now = t(2028, 1, 28)  # the refill instant: topped up to 5
        assert (await validate(h, admin, key))["credits_remaining"] == 5
        r = await h.client.get("/x", headers=bearer(key))
        assert r.status_code == 200 and r.headers["x-credits-remaining"] == "4"
        # Once a month: February's 28th, in a leap year, then March's.
        clock.now = t(2028, 2, 27, 23)
        assert (await validate(h, admin, key))["credits_remaining"] == 4
        clock.now = t(2028, 2, 29, 1)
        assert (await validate(h, admin, key))["credits_remaining"] == 5


async def test_daily_refill_and_interval_seconds(tmp_path: Path) -> None:
    clock = FakeClock(t(2027, 6, 1, 22))
    async with open_harness(tmp_path, plugins=KEY_AUTH, clock=clock) as h:
        admin = await setup_admin(h)
        daily = {"remaining": 1, "refill_amount": 2, "refill_interval": "daily"}
        _, key = await create_key(h, admin, credits=daily)
        assert (await h.client.get("/x", headers=bearer(key))).status_code == 200
        refused = await h.client.get("/x", headers=bearer(key))
        assert_problem(refused, 429, "QUOTA_EXCEEDED")
        assert refused.headers["retry-after"] == str(2 * 3600)
        clock.now = t(2027, 6, 2)
        r = await h.client.get("/x", headers=bearer(key))
        assert r.status_code == 200 and r.headers["x-credits-remaining"] == "1"


async def test_validate_reports_what_the_next_request_meets(tmp_path: Path) -> None:
    clock = FakeClock()
    async with open_harness(tmp_path, plugins=KEY_AUTH, clock=clock) as h:
        admin = await setup_admin(h)
        _, key = await create_key(h, admin, credits={"remaining": 50}, rate_limits=[MINUTE_10])
        for _ in range(3):
            assert (await h.client.get("/x", headers=bearer(key))).status_code == 200
        # Validate spends nothing: twice the same.
        first = await validate(h, admin, key)
        assert first == await validate(h, admin, key)
        assert first["valid"] is True and first["credits_remaining"] == 47
        [limit] = first["rate_limits"]
        assert limit["name"] == "minute" and limit["limit"] == 10 and limit["remaining"] == 7
        r = await h.client.get("/x", headers=bearer(key))
        assert r.status_code == 200
        # The next request took one of each: its headers say the rest.
        assert r.headers["x-credits-remaining"] == str(first["credits_remaining"] - 1)
        assert r.headers["x-ratelimit-remaining"] == str(limit["remaining"] - 1)
        after = await validate(h, admin, key)
        assert after["credits_remaining"] == 46 and after["rate_limits"][0]["remaining"] == 6
        assert after["rate_limits"][0]["reset_seconds"] > 0

        # spend: N is a request of cost N (Unkey's verify).
        spent = await validate(h, admin, key, spend=5)
        assert spent["valid"] is True and spent["credits_remaining"] == 41
        assert spent["rate_limits"][0]["remaining"] == 1
        limited = await validate(h, admin, key, spend=2)
        assert limited["valid"] is False and limited["code"] == "RATE_LIMITED"
        assert (await validate(h, admin, key))["credits_remaining"] == 41  # nothing taken
        r = await h.client.get("/x", headers=bearer(key))
        assert (
            r.headers["x-credits-remaining"] == "40" and r.headers["x-ratelimit-remaining"] == "0"
        )
        rate_refused = await h.client.get("/x", headers=bearer(key))
        assert_problem(rate_refused, 429, "RATE_LIMITED")
        assert rate_refused.headers["x-credits-remaining"] == "40"

        # Quota: a spend above the balance is refused and takes nothing.
        _, small = await create_key(h, admin, credits={"remaining": 3})
        quota = await validate(h, admin, small, spend=4)
        assert quota["valid"] is False and quota["code"] == "QUOTA_EXCEEDED"
        assert quota["credits_remaining"] == 0
        assert (await validate(h, admin, small))["credits_remaining"] == 3
        assert (await validate(h, admin, small, spend=3))["credits_remaining"] == 0

        # A key without credits or limits: no credits_remaining, no header.
        _, plain = await create_key(h, admin)
        doc = await validate(h, admin, plain, spend=1)
        assert doc["valid"] is True and "credits_remaining" not in doc
        assert doc["rate_limits"] == []
        r = await h.client.get("/x", headers=bearer(plain))
        assert r.status_code == 200 and "x-credits-remaining" not in r.headers
        # An invalid key: no state.
        doc = await validate(h, admin, "tg_nope")
        assert doc == {"valid": False, "code": "INVALID_KEY"}


async def test_identity_pool_state_and_operations(tmp_path: Path) -> None:
    clock = FakeClock()
    async with open_harness(tmp_path, plugins=KEY_AUTH, clock=clock) as h:
        admin = await setup_admin(h)
        r = await op(
            h,
            admin,
            "/identities",
            {"external_id": "acme", "credits": {"remaining": 10}, "rate_limits": [MINUTE_10]},
        )
        assert r.status_code == 201, r.text
        ident = r.json()["id"]
        _, key = await create_key(h, admin, identity_id=ident, credits={"remaining": 100})
        doc = await validate(h, admin, key)
        # The fewest left of the key's own balance and its pool's.
        assert doc["credits_remaining"] == 10
        assert [lim["remaining"] for lim in doc["rate_limits"]] == [10]
        r = await h.client.get("/x", headers=bearer(key))
        assert r.headers["x-credits-remaining"] == "9" and r.headers["x-ratelimit-remaining"] == "9"
        r = await op(h, admin, f"/identities/{ident}/credits", {"op": "decrement", "amount": 9})
        assert r.status_code == 200, r.text
        assert r.json()["credits_remaining"] == 0 and r.json()["previous_remaining"] == 9
        refused = await h.client.get("/x", headers=bearer(key))
        assert_problem(refused, 429, "QUOTA_EXCEEDED")
        assert refused.headers["x-credits-remaining"] == "0"
        r = await op(h, admin, f"/identities/{ident}/credits", {"op": "set", "amount": 2})
        assert r.json()["credits_remaining"] == 2
        assert (await validate(h, admin, key))["credits_remaining"] == 2
        usage = await h.admin.get(f"/identities/{ident}/usage", headers=admin)
        assert usage.json()["credits_remaining"] == 2


async def test_operations_are_exact_audited_and_bounded(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    async with open_harness(tmp_path, plugins=KEY_AUTH, upstream=upstream) as h:
        admin = await setup_admin(h)
        key_id, key = await create_key(h, admin, credits={"remaining": 10})
        path = f"/keys/{key_id}/credits"
        assert (await h.client.get("/x", headers=bearer(key))).status_code == 200
        r = await op(h, admin, path, {"op": "increment", "amount": 5})
        assert r.status_code == 200, r.text
        assert r.json() == {
            "id": key_id,
            "op": "increment",
            "amount": 5,
            "previous_remaining": 9,
            "credits_remaining": 14,
        }
        r = await op(h, admin, path, {"op": "decrement", "amount": 4})
        assert r.json()["credits_remaining"] == 10
        # Below zero: 409, nothing taken.
        problem = assert_problem(
            await op(h, admin, path, {"op": "decrement", "amount": 11}), 409, "INSUFFICIENT_CREDITS"
        )
        assert problem["credits_remaining"] == 10
        r = await op(h, admin, path, {"op": "set", "amount": 0})
        assert r.json()["credits_remaining"] == 0
        assert_problem(await h.client.get("/x", headers=bearer(key)), 429, "QUOTA_EXCEEDED")
        r = await op(h, admin, path, {"op": "set", "amount": 7})
        view = (await h.admin.get(f"/keys/{key_id}/usage", headers=admin)).json()
        assert view["credits_remaining"] == 7

        # Bad input: 4xx with a code, never a 500.
        for body in (
            {"op": "double", "amount": 1},
            {"op": "increment", "amount": 0},
            {"op": "decrement", "amount": -1},
            {"op": "set", "amount": 10**15 + 1},
            {"op": "increment"},
            {"op": "increment", "amount": 1, "extra": 1},
            [],
        ):
            assert_problem(await op(h, admin, path, body), 400, "VALIDATION_ERROR")
        r = await op(h, admin, path, {"op": "set", "amount": 10**15})
        assert r.json()["credits_remaining"] == 10**15
        assert_problem(
            await op(h, admin, path, {"op": "increment", "amount": 1}), 400, "VALIDATION_ERROR"
        )
        no_credits, _ = await create_key(h, admin)
        assert_problem(
            await op(h, admin, f"/keys/{no_credits}/credits", {"op": "set", "amount": 1}),
            409,
            "NO_CREDITS",
        )
        assert_problem(
            await op(h, admin, "/keys/key_nope/credits", {"op": "set", "amount": 1}),
            404,
            "NOT_FOUND",
        )
        assert_problem(
            await op(h, admin, "/identities/idn_nope/credits", {"op": "set", "amount": 1}),
            404,
            "NOT_FOUND",
        )
        for spend in (-1, 10**6 + 1, "1"):
            r = await h.admin.post(
                "/keys/validate", json={"key": key, "spend": spend}, headers=admin
            )
            assert_problem(r, 400, "VALIDATION_ERROR")
        for credits in (
            {"remaining": 1, "refill_interval": "daily", "refill_interval_seconds": 60},
            {"remaining": 1, "refill_interval": "monthly", "refill_day": 29},
            {"remaining": 1, "refill_interval": "daily", "refill_day": 2},
            {"remaining": 1, "refill_interval": "hourly"},
        ):
            r = await h.admin.post(
                "/keys", json={"name": "k", "owner": "o", "credits": credits}, headers=admin
            )
            assert_problem(r, 400, "VALIDATION_ERROR")
            r = await h.admin.patch(f"/keys/{key_id}", json={"credits": credits}, headers=admin)
            assert_problem(r, 400, "VALIDATION_ERROR")

        audit = (await h.admin.get("/audit?action=credits.decrement", headers=admin)).json()
        [entry] = audit["items"]
        assert entry["target_id"] == key_id
        assert entry["details"] == {"amount": 4, "old": 14, "new": 10}
        actions = (await h.admin.get("/audit?limit=100", headers=admin)).json()["items"]
        ops = [e["action"] for e in actions if e["action"].startswith("credits.")]
        assert ops == [*["credits.set"] * 3, "credits.decrement", "credits.increment"]


async def test_spends_off_the_request_path_reach_the_hook(tmp_path: Path) -> None:
    async with open_harness(tmp_path, plugins=KEY_AUTH) as h:
        admin = await setup_admin(h)
        key_id, key = await create_key(h, admin, credits={"remaining": 10})
        gateway = h.server.gateway
        assert gateway is not None
        calls: list[tuple[Any, ...]] = []
        gateway.actors.on_spent = lambda *args: calls.append(args)
        await validate(h, admin, key, spend=2)
        await op(h, admin, f"/keys/{key_id}/credits", {"op": "decrement", "amount": 3})
        await op(h, admin, f"/keys/{key_id}/credits", {"op": "increment", "amount": 1})
        assert [(c[0], c[2], c[3], c[4]) for c in calls] == [
            (key_id, 8, 2, None),
            (key_id, 5, 3, None),
        ]
        assert calls[0][1].remaining == 10
