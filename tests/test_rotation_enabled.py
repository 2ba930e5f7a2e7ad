"""``enabled`` is chain-wide, as credits and rate limits are: disabling (or
enabling) any key of a rotation chain through ``PATCH /keys/{id}`` applies to
every key of it, the old key in its grace too, audited for each key (the
real ``triogate serve``, real HTTP, a real upstream)."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.helpers_process import serving
from tests.test_customers_process import _code, _patch, _post, _routes, _setup, echo_upstream
from tests.test_reload import config_doc, write_doc


def test_disabling_a_rotated_key_disables_its_chain_and_enabling_restores_it(
    tmp_path: Path,
) -> None:
    with echo_upstream() as upstream:
        doc = config_doc(tmp_path / "data", {"echo": upstream}, _routes(a={}))
        cfg = write_doc(tmp_path / "gw.toml", doc)
        with (
            serving(cfg) as sp,
            sp.client() as c,
            httpx.Client(base_url=sp.proxy_url, timeout=10) as proxy,
        ):
            admin = _setup(c)

            def codes(*keys: str) -> list[str]:
                return [_code(proxy.get("/a/x", headers={"x-api-key": k})) for k in keys]

            first = _post(c, admin, "/keys", {"name": "k", "owner": "o"})
            r = c.post(f"/keys/{first['id']}/rotate", json={"grace_seconds": 3600}, headers=admin)
            assert r.status_code == 200, r.text
            new = r.json()["new"]
            assert codes(first["key"], new["key"]) == ["200", "200"]  # the old one in its grace

            view = _patch(c, admin, f"/keys/{new['id']}", {"enabled": False})
            assert view["enabled"] is False
            assert codes(first["key"], new["key"]) == ["403 KEY_DISABLED"] * 2
            old_view = c.get(f"/keys/{first['id']}", headers=admin).json()
            assert (old_view["status"], old_view["enabled"]) == ("rotated", False)

            _patch(c, admin, f"/keys/{new['id']}", {"enabled": True})
            assert codes(first["key"], new["key"]) == ["200", "200"]
            # Enabling twice changes nothing, and audits nothing more.
            _patch(c, admin, f"/keys/{first['id']}", {"enabled": True})

            r = c.get("/audit", params={"limit": "50"}, headers=admin)
            entries = [
                (e["action"], e["target_id"])
                for e in r.json()["items"]
                if e["action"] in ("key.disable", "key.enable")
            ]
            assert sorted(entries) == sorted(
                [
                    ("key.disable", new["id"]),
                    ("key.disable", first["id"]),
                    ("key.enable", new["id"]),
                    ("key.enable", first["id"]),
                ]
            )
