"""Usage history through the real ``triogate serve`` and real upstreams: a
known mix of requests (allowed, rate-limited, out of credits, a revoked and
a disabled key, an upstream answering 502 and one that is down) comes back
exactly, by outcome, in the minute and hour history of each key and of
their identity; and the CLI prints it, as a table and as JSON."""

from __future__ import annotations

import http.server
import json
import time
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from tests.helpers_process import free_ports, run_cli, serving, threaded_upstream
from tests.test_reload import config_doc, route, write_doc

JSON = dict[str, Any]
OUTCOMES = ("allowed", "rate_limited", "quota_exceeded", "invalid", "upstream_error")


class _Upstream(http.server.BaseHTTPRequestHandler):
    """200 "ok", or 502 for a path with ``bad`` in it."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        status = 502 if "bad" in self.path else 200
        self.send_response(status)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


def upstream() -> AbstractContextManager[str]:
    return threaded_upstream(_Upstream)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _sums(doc: JSON) -> JSON:
    out = {name: sum(i[name] for i in doc["items"]) for name in (*OUTCOMES, "total")}
    for klass in ("1xx", "2xx", "3xx", "4xx", "5xx"):
        out[klass] = sum(i["by_status_class"][klass] for i in doc["items"])
    return out


def _expected(classes: dict[str, int], **outcomes: int) -> JSON:
    out: JSON = {name: outcomes.get(name, 0) for name in OUTCOMES}
    out["total"] = sum(outcomes.values())
    for klass in ("1xx", "2xx", "3xx", "4xx", "5xx"):
        out[klass] = classes.get(klass, 0)
    return out


def test_history_matches_the_requests_sent_by_outcome(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (down_port,) = free_ports()  # nothing listens there: the upstream is down
    with upstream() as good:
        key_auth = {"key-auth": {}}
        doc = config_doc(
            data,
            {"good": good, "down": f"http://127.0.0.1:{down_port}"},
            [
                route("ok", "/ok/{rest:path}", "good", plugins=key_auth),
                route("bad", "/bad/{rest:path}", "good", plugins=key_auth),
                route("down", "/down/{rest:path}", "down", plugins=key_auth),
            ],
            storage={"flush_interval_seconds": 0.05},
        )
        cfg = write_doc(tmp_path / "gw.toml", doc)
        begun = time.time()
        with (
            serving(cfg) as sp,
            sp.client() as c,
            httpx.Client(base_url=sp.proxy_url, timeout=10) as proxy,
        ):
            r = c.post("/setup", json={"name": "root", "email": "root@example.com"})
            assert r.status_code == 201, r.text
            admin = {"Authorization": f"Bearer {r.json()['key']}"}

            def post(path: str, body: JSON) -> JSON:
                r = c.post(path, json=body, headers=admin)
                assert r.status_code == 201, r.text
                out: JSON = r.json()
                return out

            def key(**fields: Any) -> JSON:
                return post("/keys", {"name": "k", "owner": "o", **fields})

            def send(path: str, k: JSON, times: int) -> list[int]:
                return [
                    proxy.get(path, headers={"x-api-key": k["key"]}).status_code
                    for _ in range(times)
                ]

            ident = post("/identities", {"external_id": "acme"})
            allowed = key(identity_id=ident["id"])
            limited = key(rate_limits=[{"name": "h", "limit": 3, "period_seconds": 3600}])
            metered = key(credits={"remaining": 2})
            revoked = key()
            failing = key(identity_id=ident["id"])
            disabled = key(identity_id=ident["id"])

            assert send("/ok/x", allowed, 4) == [200] * 4
            assert send("/ok/x", limited, 5) == [200] * 3 + [429] * 2
            assert send("/ok/x", metered, 4) == [200] * 2 + [429] * 2
            assert c.delete(f"/keys/{revoked['id']}", headers=admin).status_code == 200
            assert send("/ok/x", revoked, 3) == [401] * 3
            bad = send("/bad/x", failing, 2) + send("/down/x", failing, 2)
            assert bad[:2] == [502, 502] and all(s in (502, 503, 504) for s in bad[2:]), bad
            r = c.patch(f"/keys/{disabled['id']}", json={"enabled": False}, headers=admin)
            assert r.status_code == 200, r.text
            assert send("/ok/x", disabled, 2) == [403] * 2
            # An unknown key belongs to no one: counted nowhere.
            assert proxy.get("/ok/x", headers={"x-api-key": "tg_nope"}).status_code == 401

            expected = {
                allowed["id"]: _expected({"2xx": 4}, allowed=4),
                limited["id"]: _expected({"2xx": 3, "4xx": 2}, allowed=3, rate_limited=2),
                metered["id"]: _expected({"2xx": 2, "4xx": 2}, allowed=2, quota_exceeded=2),
                revoked["id"]: _expected({"4xx": 3}, invalid=3),
                failing["id"]: _expected({"5xx": 4}, upstream_error=4),
                disabled["id"]: _expected({"4xx": 2}, invalid=2),
            }
            identity = _expected(
                {"2xx": 4, "4xx": 2, "5xx": 4}, allowed=4, invalid=2, upstream_error=4
            )
            window = {"from": _iso(begun - 120), "to": _iso(time.time() + 120)}

            def history(path: str, granularity: str) -> JSON:
                r = c.get(path, params={"granularity": granularity, **window}, headers=admin)
                assert r.status_code == 200, r.text
                out: JSON = r.json()
                return out

            # Flushed every 50 ms: wait (bounded) until the last key's counts are in.
            last = f"/keys/{disabled['id']}/usage/history"
            for _ in range(200):
                if _sums(history(last, "minute"))["total"] == 2:
                    break
                time.sleep(0.05)
            for key_id, want in expected.items():
                for granularity in ("minute", "hour"):
                    got = history(f"/keys/{key_id}/usage/history", granularity)
                    assert _sums(got) == want, (key_id, granularity, got)
                    assert all(i["total"] > 0 for i in got["items"])  # sparse
            idn_path = f"/identities/{ident['id']}/usage/history"
            for granularity in ("minute", "hour", "day"):
                assert _sums(history(idn_path, granularity)) == identity, granularity
            # The minute buckets are the minutes the requests were made in.
            minutes = history(f"/keys/{limited['id']}/usage/history", "minute")["items"]
            assert 1 <= len(minutes) <= 2
            for item in minutes:
                start = datetime.fromisoformat(item["start"]).timestamp()
                assert start % 60 == 0 and begun - 60 < start <= time.time()
            assert sp.stop() == 0

        # The CLI reads the same history from the data directory.
        args = ("--granularity", "hour", "--from", window["from"], "--to", window["to"])
        out = run_cli("keys", "usage-history", limited["id"], "-c", str(cfg), *args, "--json")
        assert out.returncode == 0, out.stderr
        assert _sums(json.loads(out.stdout)) == expected[limited["id"]]
        out = run_cli("keys", "usage-history", limited["id"], "-c", str(cfg), *args)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[1].split() == [
            "start", "total", *OUTCOMES, "1xx", "2xx", "3xx", "4xx", "5xx"
        ]  # fmt: skip
        rows = [line.split() for line in lines[2:]]
        assert sum(int(row[3]) for row in rows) == 2  # rate_limited
        out = run_cli("identities", "usage-history", ident["id"], "-c", str(cfg), *args, "--json")
        assert out.returncode == 0, out.stderr
        assert _sums(json.loads(out.stdout)) == identity
        out = run_cli(
            "keys", "usage-history", limited["id"], "-c", str(cfg), "--granularity", "week"
        )
        assert out.returncode == 1 and "granularity" in out.stderr, out.stderr
