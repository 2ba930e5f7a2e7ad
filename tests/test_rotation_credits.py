"""Rotating a metered key moves its credit balance to the new key."""

from __future__ import annotations

from pathlib import Path

from triogate.audit import Actor
from triogate.models import RotateKeyRequest
from triogate.testing import open_harness


async def test_rotation_moves_the_balance(tmp_path: Path) -> None:
    async with open_harness(tmp_path, plugins={"key-auth": {}}) as h:
        gw = h.server.gateway
        assert gw is not None
        old_key = await h.create_key([], credits={"remaining": 5})
        for _ in range(3):
            r = await h.client.get("/x", headers={"x-api-key": old_key})
            assert r.status_code == 200
        await gw.actors.flush(list(gw.actors.actors.values()))
        old_id = gw.keys.list(limit=1).items[0].id
        rotated = await gw.keys.rotate(old_id, RotateKeyRequest(grace_seconds=60), Actor("t"))
        assert rotated.new.credits is not None and rotated.new.credits.remaining == 2
        new_key = rotated.new.key
        # The old key still authenticates in its grace, but has nothing to spend.
        r = await h.client.get("/x", headers={"x-api-key": old_key})
        assert r.status_code == 429 and r.json()["code"] == "QUOTA_EXCEEDED"
        assert int(r.headers["retry-after"]) >= 1
        statuses = [
            (await h.client.get("/x", headers={"x-api-key": new_key})).status_code
            for _ in range(3)
        ]
        assert statuses == [200, 200, 429]
