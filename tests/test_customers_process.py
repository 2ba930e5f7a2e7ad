"""Identities, plans, enable/disable, keyspaces, roles and route-bound
limits on the data plane, through the real ``triogate serve`` and a real
upstream (one worker, and two sharing one identity's pool)."""

from __future__ import annotations

import http.server
import json
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx

from tests.helpers_process import free_ports, serving, threaded_upstream
from tests.test_reload import config_doc, route, write_doc

JSON = dict[str, Any]


class _Echo(http.server.BaseHTTPRequestHandler):
    """Answers with the X-Key-* headers it was sent, as JSON."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        seen = {k.lower(): v for k, v in self.headers.items() if k.lower().startswith("x-key")}
        body = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def echo_upstream() -> AbstractContextManager[str]:
    return threaded_upstream(_Echo)


def _setup(c: httpx.Client) -> dict[str, str]:
    r = c.post("/setup", json={"name": "root", "email": "root@example.com"})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}"}


def _post(c: httpx.Client, admin: dict[str, str], path: str, body: JSON) -> JSON:
    r = c.post(path, json=body, headers=admin)
    assert r.status_code == 201, r.text
    out: JSON = r.json()
    return out


def _patch(c: httpx.Client, admin: dict[str, str], path: str, body: JSON) -> JSON:
    r = c.patch(path, json=body, headers=admin)
    assert r.status_code == 200, r.text
    out: JSON = r.json()
    return out


def _code(r: httpx.Response) -> str:
    if r.status_code == 200:
        return "200"
    return f"{r.status_code} {r.json().get('code')}"


def _routes(**key_auth: JSON) -> list[JSON]:
    return [
        route(name, f"/{name}/{{rest:path}}", "echo", plugins={"key-auth": options})
        for name, options in key_auth.items()
    ]


MINUTE_10 = {"name": "minute", "limit": 10, "period_seconds": 60}


def test_identity_plan_disable_roles_keyspace_and_route_limits(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with echo_upstream() as upstream:
        doc = config_doc(
            data,
            {"echo": upstream},
            _routes(
                a={},
                b={},
                live={"keyspace": "live"},
                any={"any_scopes": ["x:read", "y:read"], "deny_roles": ["blocked"]},
            ),
            keyspaces={"live": {"prefix": "live_"}},
        )
        cfg = write_doc(tmp_path / "gw.toml", doc)
        with (
            serving(cfg) as sp,
            sp.client() as c,
            httpx.Client(base_url=sp.proxy_url, timeout=10) as proxy,
        ):

            def get(path: str, key: str, **headers: str) -> httpx.Response:
                return proxy.get(path, headers={"x-api-key": key, **headers})

            admin = _setup(c)

            # Two keys of one identity limited to 10 a minute: exactly 10 together.
            ident = _post(
                c, admin, "/identities", {"external_id": "acme", "rate_limits": [MINUTE_10]}
            )
            k1 = _post(c, admin, "/keys", {"name": "1", "owner": "o", "identity_id": ident["id"]})
            k2 = _post(c, admin, "/keys", {"name": "2", "owner": "o", "identity_id": ident["id"]})
            codes = [_code(get("/a/x", (k1, k2)[i % 2]["key"])) for i in range(30)]
            assert codes.count("200") == 10, codes
            assert set(codes) == {"200", "429 RATE_LIMITED"}

            # A plan change reaches every key of the plan on the next request.
            plan = _post(c, admin, "/plans", {"name": "free", "scopes": ["x:read"]})
            pk = [
                _post(c, admin, "/keys", {"name": f"p{i}", "owner": "o", "plan_id": plan["id"]})
                for i in range(3)
            ]
            for k in pk:
                assert _code(get("/any/x", k["key"])) == "200"
            _patch(c, admin, f"/plans/{plan['id']}", {"scopes": ["z:read"]})
            for k in pk:
                r = get("/any/x", k["key"])
                assert _code(r) == "403 INSUFFICIENT_SCOPE", r.text
                assert r.json()["required_scopes"] == ["x:read", "y:read"]
            _patch(
                c,
                admin,
                f"/plans/{plan['id']}",
                {"scopes": ["y:read"], "rate_limits": [{**MINUTE_10, "limit": 1}]},
            )
            for k in pk:
                assert _code(get("/any/x", k["key"])) == "200"
                assert _code(get("/any/x", k["key"])) == "429 RATE_LIMITED"

            # A disabled key is 403 and comes back when enabled; so is an identity's.
            solo = _post(c, admin, "/keys", {"name": "solo", "owner": "o"})
            assert _code(get("/a/x", solo["key"])) == "200"
            _patch(c, admin, f"/keys/{solo['id']}", {"enabled": False})
            assert _code(get("/a/x", solo["key"])) == "403 KEY_DISABLED"
            _patch(c, admin, f"/keys/{solo['id']}", {"enabled": True})
            assert _code(get("/a/x", solo["key"])) == "200"
            other = _post(c, admin, "/identities", {"external_id": "globex"})
            ik = _post(c, admin, "/keys", {"name": "ik", "owner": "o", "identity_id": other["id"]})
            assert _code(get("/a/x", ik["key"])) == "200"
            _patch(c, admin, f"/identities/{other['id']}", {"enabled": False})
            assert _code(get("/a/x", ik["key"])) == "403 KEY_DISABLED"
            _patch(c, admin, f"/identities/{other['id']}", {"enabled": True})
            assert _code(get("/a/x", ik["key"])) == "200"
            # A revoked key keeps its 401, disabled or not.
            _patch(c, admin, f"/keys/{solo['id']}", {"enabled": False})
            assert c.delete(f"/keys/{solo['id']}", headers=admin).status_code in (200, 204)
            assert _code(get("/a/x", solo["key"])) == "401 KEY_REVOKED"

            # A keyspace-bound route refuses a key of another keyspace as unknown.
            live = _post(c, admin, "/keys", {"name": "l", "owner": "o", "keyspace": "live"})
            assert live["key"].startswith("live_")
            assert _code(get("/live/x", live["key"])) == "200"
            assert _code(get("/live/x", ik["key"])) == "401 INVALID_KEY"
            assert _code(get("/a/x", live["key"])) == "200"  # no keyspace: any

            # Roles: their scopes count, deny_roles refuses, X-Key-Roles goes upstream.
            _post(c, admin, "/roles", {"name": "reader", "scopes": ["y:read"]})
            _post(c, admin, "/roles", {"name": "blocked", "scopes": []})
            rk = _post(c, admin, "/keys", {"name": "r", "owner": "o", "roles": ["reader"]})
            r = get("/any/x", rk["key"], **{"x-key-roles": "admin", "x-key-id": "key_forged"})
            assert _code(r) == "200", r.text
            assert r.json()["x-key-roles"] == "reader" and r.json()["x-key-id"] == rk["id"]
            # A client's own X-Key-Roles never reaches the upstream, keyed or not.
            assert "x-key-roles" not in get("/a/x", live["key"], **{"x-key-roles": "a"}).json()
            bk = _post(
                c, admin, "/keys", {"name": "b", "owner": "o", "roles": ["reader", "blocked"]}
            )
            assert _code(get("/any/x", bk["key"])) == "403 ROLE_DENIED"
            assert _code(get("/a/x", bk["key"])) == "200"

            # A route-bound limit applies only on its route.
            bound = {**MINUTE_10, "name": "b-only", "limit": 1, "routes": ["b"]}
            lk = _post(c, admin, "/keys", {"name": "rl", "owner": "o", "rate_limits": [bound]})
            assert [_code(get("/a/x", lk["key"])) for _ in range(3)] == ["200"] * 3
            assert _code(get("/b/x", lk["key"])) == "200"
            assert _code(get("/b/x", lk["key"])) == "429 RATE_LIMITED"
            assert _code(get("/a/x", lk["key"])) == "200"


def test_unknown_keyspace_on_a_route_is_a_config_error(tmp_path: Path) -> None:
    from tests.helpers_process import run_cli

    doc = config_doc(
        tmp_path / "data",
        {"echo": "http://127.0.0.1:9"},
        _routes(a={"keyspace": "nope"}),
    )
    cfg = write_doc(tmp_path / "gw.toml", doc)
    result = run_cli("check-config", str(cfg))
    assert result.returncode != 0
    assert "keyspace 'nope' is not configured" in result.stderr + result.stdout


def test_two_workers_share_one_identitys_pool_exactly(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    data = tmp_path / "data"
    with echo_upstream() as upstream:
        doc = config_doc(
            data,
            {"echo": upstream},
            _routes(a={}),
            server={"proxy_listen": f"127.0.0.1:{port}", "workers": 2},
        )
        cfg = write_doc(tmp_path / "gw.toml", doc)
        with serving(cfg) as sp, sp.client() as c:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if sum("proxy listening" in line for line in sp.stdout_lines) == 2:
                    break
                time.sleep(0.05)
            assert sum("proxy listening" in line for line in sp.stdout_lines) == 2
            admin = _setup(c)
            ident = _post(
                c, admin, "/identities", {"external_id": "acme", "rate_limits": [MINUTE_10]}
            )
            keys = [
                _post(c, admin, "/keys", {"name": str(i), "owner": "o", "identity_id": ident["id"]})
                for i in range(2)
            ]
            codes = []
            for i in range(30):
                # New connections each time, so the kernel spreads them over both.
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as proxy:
                    r = proxy.get("/a/x", headers={"x-api-key": keys[i % 2]["key"]})
                    codes.append(_code(r))
            assert codes.count("200") == 10, codes
            assert sp.stop() == 0  # the supervisor stops its workers: none left behind
