"""Hot reload (``POST /config/reload``, SIGHUP) and graceful shutdown.

In-process tests run the real ``Server`` from a config *file* (``source=``),
with fake upstreams and real HTTP; the signal tests run ``triogate serve -c``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.helpers_process import run_cli, serving, start_serve
from triogate.config import load_config
from triogate.control.audit import Actor
from triogate.control.models import CreateKeyRequest
from triogate.runtime.gateway import Gateway, open_gateway
from triogate.runtime.server import Server, ServerInfo
from triogate.testing import FakeResponse, FakeUpstream, RecordedRequest, open_harness

# ---- config files ------------------------------------------------------------------


def _toml(value: Any) -> str:
    """An inline TOML value (strings as JSON strings: valid TOML basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def route(name: str, path: str, upstream: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "path": path, "upstream": upstream, **extra}


def config_doc(
    data_dir: Path,
    upstreams: dict[str, str | dict[str, Any]],
    routes: list[dict[str, Any]],
    *,
    server: dict[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A whole config: ``upstreams`` maps a name to a target URL (or to its
    whole table)."""
    return {
        "server": {
            "proxy_listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "data_dir": str(data_dir),
            "shutdown_grace_seconds": 3,
            **(server or {}),
        },
        "log": {"access_log": ""},
        "upstreams": {
            name: {"targets": [u], "read_timeout_seconds": 5} if isinstance(u, str) else u
            for name, u in upstreams.items()
        },
        "routes": routes,
        **sections,
    }


def write_doc(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in doc.items()))
    return path


# ---- an in-process server started from a file ------------------------------------------


@dataclass
class Live:
    server: Server
    info: ServerInfo
    path: Path
    proxy: httpx.AsyncClient
    admin: httpx.AsyncClient
    admin_id: str
    headers: dict[str, str]

    @property
    def gateway(self) -> Gateway:
        assert self.server.gateway is not None
        return self.server.gateway

    async def reload(self) -> httpx.Response:
        return await self.admin.post("/config/reload", headers=self.headers)

    async def config(self) -> dict[str, Any]:
        r = await self.admin.get("/config", headers=self.headers)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def create_key(self, **fields: Any) -> tuple[str, str]:
        r = await self.admin.post(
            "/keys", json={"name": "k", "owner": "o", **fields}, headers=self.headers
        )
        assert r.status_code == 201, r.text
        return r.json()["id"], r.json()["key"]


@asynccontextmanager
async def upstreams(*fakes: FakeUpstream) -> AsyncIterator[None]:
    """Run fake upstreams (they serve forever: cancelled on the way out)."""
    async with trio.open_nursery() as nursery:
        for fake in fakes:
            await nursery.start(fake.run)
        yield
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def serve_file(path: Path, *, setup: bool = True) -> AsyncIterator[Live]:
    server = Server(load_config(path), source=str(path))
    async with trio.open_nursery() as nursery:
        info = await nursery.start(server.run)
        async with (
            httpx.AsyncClient(base_url=info.proxy_url, timeout=10) as proxy,
            httpx.AsyncClient(base_url=info.admin_url, timeout=10) as admin,
        ):
            admin_id, headers = "", {}
            if setup:
                r = await admin.post("/setup", json={"name": "root", "email": "root@example.com"})
                assert r.status_code == 201, r.text
                admin_id = r.json()["id"]
                headers = {"Authorization": f"Bearer {r.json()['key']}"}
            yield Live(server, info, path, proxy, admin, admin_id, headers)
        server.shutdown()
        with trio.fail_after(10):
            await server.stopped.wait()


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``check`` until it holds (fail after ``within`` seconds)."""
    with trio.fail_after(within):
        while not check():  # noqa: ASYNC110
            await trio.sleep(0.01)


async def slow_on_slow_path(request: RecordedRequest) -> FakeResponse:
    """``/slow`` takes a second; anything else answers at once."""
    if request.path == "/slow":
        return FakeResponse(200, body=b"finished", delay=1.0)
    return FakeResponse(200, body=b"fast")


def problem_code(r: httpx.Response) -> str:
    code: str = r.json()["code"]
    return code


# ---- reload: success ------------------------------------------------------------------


async def test_reload_adds_a_route_and_records_the_version(tmp_path: Path) -> None:
    up = FakeUpstream()
    async with upstreams(up):
        cfg = tmp_path / "gw.toml"
        write_doc(cfg, config_doc(tmp_path / "data", {"a": up.url}, [route("a", "/a", "a")]))
        async with serve_file(cfg) as live:
            assert (await live.proxy.get("/a")).status_code == 200
            r = await live.proxy.get("/b")
            assert r.status_code == 404 and problem_code(r) == "ROUTE_NOT_FOUND"
            before = await live.config()
            assert before["reloads"] == 0
            assert before["source"] == str(cfg)
            assert [h["version"] for h in before["history"]] == [before["version"]]

            write_doc(
                cfg,
                config_doc(
                    tmp_path / "data",
                    {"a": up.url},
                    [route("a", "/a", "a"), route("b", "/b", "a", upstream_path="/from-b")],
                ),
            )
            r = await live.reload()
            assert r.status_code == 200, r.text
            info = r.json()
            assert info["version"] != before["version"]
            assert info["reloads"] == 1

            r = await live.proxy.get("/b")
            assert r.status_code == 200, r.text
            assert up.requests[-1].path == "/from-b"
            assert (await live.proxy.get("/a")).status_code == 200

            after = await live.config()
            assert after["version"] == info["version"]
            assert after["reloads"] == 1
            assert [h["version"] for h in after["history"]] == [
                info["version"],
                before["version"],
            ]  # newest first
            assert after["history"][0]["loaded_at"] >= after["history"][1]["loaded_at"]
            assert after["source"] == str(cfg)

            routes = await live.admin.get("/routes", headers=live.headers)
            assert [x["name"] for x in routes.json()["items"]] == ["a", "b"]

            r = await live.admin.get(
                "/audit", params={"action": "config.reload"}, headers=live.headers
            )
            assert r.status_code == 200, r.text
            items = r.json()["items"]
            assert len(items) == 1, items
            assert items[0]["actor_id"] == live.admin_id
            assert items[0]["details"] == {
                "version": info["version"],
                "previous": before["version"],
            }


async def test_history_keeps_the_last_five_versions(tmp_path: Path) -> None:
    up = FakeUpstream()
    async with upstreams(up):
        cfg = tmp_path / "gw.toml"
        write_doc(cfg, config_doc(tmp_path / "data", {"a": up.url}, [route("a", "/a", "a")]))
        async with serve_file(cfg) as live:
            versions = [(await live.config())["version"]]
            for i in range(6):
                rs = [route("a", "/a", "a"), route(f"r{i}", f"/r{i}", "a")]
                write_doc(cfg, config_doc(tmp_path / "data", {"a": up.url}, rs))
                r = await live.reload()
                assert r.status_code == 200, r.text
                versions.append(r.json()["version"])
            assert len(set(versions)) == 7
            info = await live.config()
            assert info["reloads"] == 6
            assert info["version"] == versions[-1]
            assert [h["version"] for h in info["history"]] == versions[::-1][:5]


# ---- reload: refused ----------------------------------------------------------------


async def test_bad_file_lists_every_error_and_the_old_config_keeps_serving(
    tmp_path: Path,
) -> None:
    up = FakeUpstream()
    async with upstreams(up):
        cfg = tmp_path / "gw.toml"
        data = tmp_path / "data"
        good = config_doc(data, {"a": up.url}, [route("a", "/a", "a")])
        write_doc(cfg, good)
        async with serve_file(cfg) as live:
            before = await live.config()

            async def refused(*paths: str) -> list[dict[str, str]]:
                r = await live.reload()
                assert r.status_code == 400, r.text
                body = r.json()
                assert body["code"] == "VALIDATION_ERROR"
                errors: list[dict[str, str]] = body["errors"]
                assert sorted(e["path"] for e in errors) == sorted(paths), errors
                assert all(e["message"] for e in errors), errors
                # Nothing changed: old routes answer, same version, no reload.
                assert (await live.proxy.get("/a")).status_code == 200
                assert (await live.proxy.get("/new")).status_code == 404
                now = await live.config()
                assert now["version"] == before["version"]
                assert now["reloads"] == 0
                assert len(now["history"]) == 1
                return errors

            # Route and plugin errors, found while building the pipeline.
            write_doc(
                cfg,
                config_doc(
                    data,
                    {"a": up.url},
                    [
                        route("a", "/a", "a"),
                        route("new", "/new", "a"),
                        route("r2", "/x/{id:nosuchtype}", "a"),
                        route("r3", "/y", "a", plugins={"no-such-plugin": {}}),
                        route(
                            "r4",
                            "/z",
                            "a",
                            plugins={"rate-limit": {"limit": "three", "period_seconds": 60}},
                        ),
                    ],
                ),
            )
            errors = await refused(
                "routes[2].path",
                "routes[3].plugins.no-such-plugin",
                "routes[4].plugins.rate-limit.limit",
            )
            by_path = {e["path"]: e["message"] for e in errors}
            assert "nosuchtype" in by_path["routes[2].path"]
            assert "no-such-plugin" in by_path["routes[3].plugins.no-such-plugin"]

            # Decoding errors: an unknown field and a wrong type, together.
            doc = config_doc(
                data,
                {"a": up.url},
                [route("a", "/a", "a"), route("new", "/new", "a")],
                server={"shutdown_grace_seconds": "ten", "bogus": 1},
            )
            write_doc(cfg, doc)
            await refused("server.bogus", "server.shutdown_grace_seconds")

            # Cross-field errors: an unknown upstream and a duplicate name.
            write_doc(
                cfg,
                config_doc(
                    data,
                    {"a": up.url},
                    [route("a", "/a", "a"), route("new", "/new", "nope"), route("a", "/q", "a")],
                ),
            )
            errors = await refused("routes[1].upstream", "routes[2].name")
            assert "nope" in {e["path"]: e["message"] for e in errors}["routes[1].upstream"]

            # Not TOML at all.
            cfg.write_text("[server\nproxy_listen = \n")
            errors = await refused("$")
            assert "invalid TOML" in errors[0]["message"]

            # The file is gone.
            cfg.unlink()
            await refused("$")

            # A good file again: accepted.
            write_doc(cfg, config_doc(data, {"a": up.url}, [route("a", "/b", "a")]))
            r = await live.reload()
            assert r.status_code == 200, r.text
            assert (await live.proxy.get("/b")).status_code == 200


@pytest.mark.parametrize(
    ("server", "fields"),
    [
        ({"proxy_listen": "127.0.0.1:1"}, ["server.proxy_listen"]),
        ({"data_dir": "elsewhere"}, ["server.data_dir"]),
        (
            {"admin_listen": "127.0.0.1:1", "proxy_server": "hypercorn"},
            ["server.admin_listen", "server.proxy_server"],
        ),
    ],
    ids=["proxy_listen", "data_dir", "several"],
)
async def test_restart_only_change_is_refused(
    tmp_path: Path, server: dict[str, Any], fields: list[str]
) -> None:
    up = FakeUpstream()
    async with upstreams(up):
        cfg = tmp_path / "gw.toml"
        data = tmp_path / "data"
        write_doc(cfg, config_doc(data, {"a": up.url}, [route("a", "/a", "a")]))
        async with serve_file(cfg) as live:
            before = await live.config()
            doc = config_doc(
                data, {"a": up.url}, [route("a", "/a", "a"), route("b", "/b", "a")], server=server
            )
            write_doc(cfg, doc)
            r = await live.reload()
            assert r.status_code == 400, r.text
            body = r.json()
            assert body["code"] == "VALIDATION_ERROR"
            assert sorted(e["path"] for e in body["errors"]) == sorted(fields), body
            for e in body["errors"]:
                assert "restart" in e["message"], e
            assert (await live.proxy.get("/a")).status_code == 200
            assert (await live.proxy.get("/b")).status_code == 404
            after = await live.config()
            assert after["version"] == before["version"] and after["reloads"] == 0


async def test_reload_without_a_config_file_is_a_conflict(tmp_path: Path) -> None:
    async with open_harness(tmp_path) as h:
        assert h.server.source is None
        r = await h.admin.post("/setup", json={"name": "root", "email": "root@example.com"})
        assert r.status_code == 201, r.text
        headers = {"Authorization": f"Bearer {r.json()['key']}"}
        r = await h.admin.post("/config/reload", headers=headers)
        assert r.status_code == 409, r.text
        assert r.json()["code"] == "CONFLICT"
        info = (await h.admin.get("/config", headers=headers)).json()
        assert info["reloads"] == 0 and info["source"] is None
        assert (await h.client.get("/x")).status_code == 200


async def test_reload_needs_the_maintenance_permission(tmp_path: Path) -> None:
    up = FakeUpstream()
    async with upstreams(up):
        cfg = tmp_path / "gw.toml"
        write_doc(cfg, config_doc(tmp_path / "data", {"a": up.url}, [route("a", "/a", "a")]))
        async with serve_file(cfg) as live:
            assert (await live.admin.post("/config/reload")).status_code == 401
            r = await live.admin.post(
                "/admins",
                json={"name": "v", "email": "v@example.com", "role": "key_viewer"},
                headers=live.headers,
            )
            assert r.status_code == 201, r.text
            viewer = {"Authorization": f"Bearer {r.json()['key']}"}
            r = await live.admin.post("/config/reload", headers=viewer)
            assert r.status_code == 403, r.text
            assert (await live.config())["reloads"] == 0


# ---- reload under load, in-flight requests ------------------------------------------------


async def test_reload_under_load_fails_no_request(tmp_path: Path) -> None:
    up = FakeUpstream()
    async with upstreams(up):
        cfg = tmp_path / "gw.toml"
        data = tmp_path / "data"

        def write(generation: int) -> None:
            # Every other reload also changes the upstream, so its old
            # Upstream object is retired while requests may be using it.
            settings = {"targets": [up.url], "read_timeout_seconds": 5 + generation % 2}
            plugins = {"request-transformer": {"add_headers": {"x-generation": str(generation)}}}
            write_doc(
                cfg, config_doc(data, {"a": settings}, [route("a", "/a", "a", plugins=plugins)])
            )

        write(0)
        async with serve_file(cfg) as live:
            failures: list[str] = []
            seen: list[list[int]] = [[] for _ in range(5)]
            stop = trio.Event()

            async def hammer(i: int) -> None:
                async with httpx.AsyncClient(base_url=live.info.proxy_url, timeout=10) as c:
                    while not stop.is_set():
                        try:
                            r = await c.get("/a")
                        except httpx.HTTPError as exc:
                            failures.append(f"client {i}: {exc!r}")
                            continue
                        if r.status_code != 200:
                            failures.append(f"client {i}: {r.status_code} {r.text}")
                            continue
                        seen[i].append(int(r.json()["headers"]["x-generation"]))

            generation = 0
            async with trio.open_nursery() as nursery:
                for i in range(5):
                    nursery.start_soon(hammer, i)
                deadline = trio.current_time() + 2.0
                while trio.current_time() < deadline:
                    await trio.sleep(0.2)
                    generation += 1
                    write(generation)
                    r = await live.reload()
                    assert r.status_code == 200, r.text
                stop.set()

            assert failures == [], failures[:10]
            assert generation >= 5
            assert all(len(s) > 10 for s in seen), [len(s) for s in seen]
            for s in seen:
                # A client's requests are sequential: never an older config
                # after a newer one.
                assert s == sorted(s), s
            for _ in range(5):
                r = await live.proxy.get("/a")
                assert r.status_code == 200
                assert r.json()["headers"]["x-generation"] == str(generation)
            info = await live.config()
            assert info["reloads"] == generation
            # Retiring the old pipelines never closed the live upstream.
            current = live.gateway.current_pipeline().upstreams["a"]
            assert not any(p.closed for p in current.pools)


async def test_in_flight_request_finishes_on_the_old_config(tmp_path: Path) -> None:
    slow = FakeUpstream([FakeResponse(200, body=b"slow done", delay=1.0)])
    main = FakeUpstream()
    async with upstreams(slow, main):
        cfg = tmp_path / "gw.toml"
        data = tmp_path / "data"
        write_doc(
            cfg,
            config_doc(
                data,
                {"slow": slow.url, "main": main.url},
                [route("a", "/a", "slow"), route("m", "/m", "main")],
            ),
        )
        async with serve_file(cfg) as live:
            old_slow = live.gateway.current_pipeline().upstreams["slow"]
            results: list[httpx.Response] = []

            async def in_flight() -> None:
                async with httpx.AsyncClient(base_url=live.info.proxy_url, timeout=10) as c:
                    results.append(await c.get("/a"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(in_flight)
                await eventually(lambda: len(slow.requests) == 1)
                # Route A and its upstream are gone from the new config.
                write_doc(cfg, config_doc(data, {"main": main.url}, [route("m", "/m", "main")]))
                r = await live.reload()
                assert r.status_code == 200, r.text
                assert not results, "the reload waited for the in-flight request"
                r = await live.proxy.get("/a")
                assert r.status_code == 404 and problem_code(r) == "ROUTE_NOT_FOUND"
                assert (await live.proxy.get("/m")).status_code == 200
                assert "slow" not in live.gateway.current_pipeline().upstreams
                # The old pipeline is not retired while the request is in flight.
                assert not any(p.closed for p in old_slow.pools)

            assert len(results) == 1
            assert results[0].status_code == 200, results[0].text
            assert results[0].content == b"slow done"
            assert len(slow.requests) == 1
            # Once idle, the old pipeline's dropped upstream is closed.
            await eventually(lambda: all(p.closed for p in old_slow.pools))


# ---- what carries over ------------------------------------------------------------------


async def test_unchanged_upstream_keeps_its_pools_a_changed_one_is_new(tmp_path: Path) -> None:
    keep, change = FakeUpstream(), FakeUpstream()
    async with upstreams(keep, change):
        cfg = tmp_path / "gw.toml"
        data = tmp_path / "data"
        rs = [route("k", "/k", "keep"), route("c", "/c", "change")]
        write_doc(cfg, config_doc(data, {"keep": keep.url, "change": change.url}, rs))
        async with serve_file(cfg) as live:
            for path in ("/k", "/c"):
                assert (await live.proxy.get(path)).status_code == 200
            old = dict(live.gateway.current_pipeline().upstreams)
            assert keep.connections == 1 and change.connections == 1

            changed = {"targets": [change.url], "read_timeout_seconds": 7}
            rs2 = [*rs, route("k2", "/k2", "keep")]
            write_doc(cfg, config_doc(data, {"keep": keep.url, "change": changed}, rs2))
            r = await live.reload()
            assert r.status_code == 200, r.text

            new = live.gateway.current_pipeline().upstreams
            assert new["keep"] is old["keep"]
            assert new["change"] is not old["change"]
            assert new["change"].config.read_timeout_seconds == 7

            for path in ("/k", "/k2", "/c"):
                assert (await live.proxy.get(path)).status_code == 200
            # The kept pool reused its keep-alive connection; the new one
            # had to connect again.
            assert keep.connections == 1
            assert change.connections == 2
            # The replaced upstream is closed once the old pipeline is idle;
            # the kept one is not.
            await eventually(lambda: all(p.closed for p in old["change"].pools))
            assert not any(p.closed for p in new["keep"].pools)
            assert (await live.proxy.get("/k")).status_code == 200
            assert keep.connections == 1


async def test_circuit_breaker_state_survives_a_reload(tmp_path: Path) -> None:
    flaky = FakeUpstream([FakeResponse(500), FakeResponse(500)])
    other = FakeUpstream()
    async with upstreams(flaky, other):
        cfg = tmp_path / "gw.toml"
        data = tmp_path / "data"
        breaker = {"circuit-breaker": {"failure_threshold": 2, "open_seconds": 60}}
        ups = {"flaky": flaky.url, "other": other.url}
        rs = [route("f", "/f", "flaky", plugins=breaker), route("o", "/o", "other")]
        write_doc(cfg, config_doc(data, ups, rs))
        async with serve_file(cfg) as live:
            assert (await live.proxy.get("/f")).status_code == 500
            assert (await live.proxy.get("/f")).status_code == 500
            r = await live.proxy.get("/f")
            assert r.status_code == 503 and problem_code(r) == "UPSTREAM_UNAVAILABLE", r.text
            assert len(flaky.requests) == 2

            write_doc(cfg, config_doc(data, ups, [*rs, route("o2", "/o2", "other")]))
            r = await live.reload()
            assert r.status_code == 200, r.text
            assert (await live.proxy.get("/o2")).status_code == 200

            # Still open after the reload: refused without touching the upstream.
            r = await live.proxy.get("/f")
            assert r.status_code == 503 and problem_code(r) == "UPSTREAM_UNAVAILABLE", r.text
            assert len(flaky.requests) == 2
            r = await live.admin.get("/upstreams", headers=live.headers)
            assert r.status_code == 200, r.text
            views = {u["name"]: u for u in r.json()["items"]}
            target = views["flaky"]["targets"][0]
            assert target["breaker"]["state"] == "open", target
            assert target["breaker"]["opened"] == 1, target


@pytest.mark.parametrize("where", ["key", "route"])
async def test_rate_limit_state_carries_over(tmp_path: Path, where: str) -> None:
    up = FakeUpstream()
    async with upstreams(up):
        cfg = tmp_path / "gw.toml"
        data = tmp_path / "data"
        plugins: dict[str, Any] = {"key-auth": {}}
        if where == "route":
            plugins["rate-limit"] = {"limit": 3, "period_seconds": 60, "by": "key"}
        rs = [route("a", "/a", "a", plugins=plugins)]
        write_doc(cfg, config_doc(data, {"a": up.url}, rs))
        async with serve_file(cfg) as live:
            fields: dict[str, Any] = {}
            if where == "key":
                fields["rate_limits"] = [{"name": "r", "limit": 3, "period_seconds": 60}]
            key_id, key = await live.create_key(**fields)
            auth = {"Authorization": f"Bearer {key}"}
            for _ in range(2):
                r = await live.proxy.get("/a", headers=auth)
                assert r.status_code == 200, r.text
            actor = live.gateway.actors.actor(key_id)

            # Another route, a changed header: a new pipeline, new plugin
            # instances; the key's actor (and its limiter state) stays.
            rs2 = [
                route("a", "/a", "a", plugins=plugins),
                route("b", "/b", "a", plugins={"request-id": {}}),
            ]
            write_doc(cfg, config_doc(data, {"a": up.url}, rs2))
            r = await live.reload()
            assert r.status_code == 200, r.text
            assert live.gateway.actors.actor(key_id) is actor

            r = await live.proxy.get("/a", headers=auth)
            assert r.status_code == 200, r.text
            r = await live.proxy.get("/a", headers=auth)
            assert r.status_code == 429, r.text
            assert problem_code(r) == "RATE_LIMITED"
            assert len(up.requests) == 3


# ---- settings read outside the pipeline -------------------------------------------------


async def test_reloaded_header_timeout_applies_or_is_refused(tmp_path: Path) -> None:
    """A reload that answers 200 makes that config the active one: a changed
    ``server.header_timeout_seconds`` must then be in force (or the reload
    refused as restart-only), never accepted and silently ignored."""
    up = FakeUpstream()
    async with upstreams(up):
        cfg = tmp_path / "gw.toml"
        data = tmp_path / "data"
        rs = [route("a", "/a", "a")]
        write_doc(cfg, config_doc(data, {"a": up.url}, rs, server={"header_timeout_seconds": 10}))
        async with serve_file(cfg) as live:
            write_doc(
                cfg, config_doc(data, {"a": up.url}, rs, server={"header_timeout_seconds": 0.3})
            )
            r = await live.reload()
            if r.status_code == 400:
                paths = [e["path"] for e in r.json()["errors"]]
                assert paths == ["server.header_timeout_seconds"], r.text
                return
            assert r.status_code == 200, r.text
            host, port = live.info.proxy_url.removeprefix("http://").split(":")
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(b"GET /a HTTP/1.1\r\nhost: x\r\n")  # never finished
                with trio.move_on_after(3):
                    answer = await stream.receive_some(4096)
                    assert answer.startswith(b"HTTP/1.1 408"), answer
                    return
            raise AssertionError(
                "reload answered 200 with header_timeout_seconds = 0.3, but an unfinished "
                "request head was still waited on after 3 s: the old value is in force"
            )


async def test_reloaded_shutdown_grace_applies_or_is_refused(tmp_path: Path) -> None:
    slow = FakeUpstream([FakeResponse(200, body=b"late", delay=2.5)])
    async with upstreams(slow):
        cfg = tmp_path / "gw.toml"
        data = tmp_path / "data"
        rs = [route("slow", "/slow", "a")]
        write_doc(cfg, config_doc(data, {"a": slow.url}, rs, server={"shutdown_grace_seconds": 5}))
        server = Server(load_config(cfg), source=str(cfg))
        async with trio.open_nursery() as nursery:
            info = await nursery.start(server.run)
            async with httpx.AsyncClient(base_url=info.admin_url, timeout=10) as admin:
                r = await admin.post("/setup", json={"name": "root", "email": "r@example.com"})
                headers = {"Authorization": f"Bearer {r.json()['key']}"}
                write_doc(
                    cfg,
                    config_doc(data, {"a": slow.url}, rs, server={"shutdown_grace_seconds": 0.5}),
                )
                r = await admin.post("/config/reload", headers=headers)
            if r.status_code == 400:
                paths = [e["path"] for e in r.json()["errors"]]
                assert paths == ["server.shutdown_grace_seconds"], r.text
                server.shutdown()
                return
            assert r.status_code == 200, r.text

            async def in_flight() -> None:
                async with httpx.AsyncClient(base_url=info.proxy_url, timeout=10) as c:
                    with contextlib.suppress(httpx.HTTPError):
                        await c.get("/slow")

            nursery.start_soon(in_flight)
            await eventually(lambda: len(slow.requests) == 1)
            started = trio.current_time()
            server.shutdown()
            with trio.fail_after(5):
                await server.stopped.wait()
            elapsed = trio.current_time() - started
            nursery.cancel_scope.cancel()
        assert elapsed < 1.5, (
            f"reload answered 200 with shutdown_grace_seconds = 0.5, but shutdown waited "
            f"{elapsed:.1f} s for a request that needed 2.5 s: the old grace (5 s) is in force"
        )


# ---- SIGHUP, through the real executable ------------------------------------------------


def _cli_json(*args: str) -> dict[str, Any]:
    res = run_cli(*args)
    assert res.returncode == 0, f"{args}: {res.stdout}\n{res.stderr}"
    body: dict[str, Any] = json.loads(res.stdout)
    return body


def _poll_version(c: httpx.Client, headers: dict[str, str], old: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        version: str = c.get("/config", headers=headers).json()["version"]
        if version != old or time.monotonic() > deadline:
            return version
        time.sleep(0.05)


def test_sighup_reloads_the_file_and_a_bad_file_changes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    admin = _cli_json(
        "admin", "create", "--data-dir", str(data), "--name", "ops", "--email", "ops@example.com",
        "--json",
    )  # fmt: skip
    headers = {"Authorization": f"Bearer {admin['key']}"}
    cfg = tmp_path / "gw.toml"
    dead = "http://127.0.0.1:9"  # routes are listed, never called
    write_doc(cfg, config_doc(data, {"a": dead}, [route("a", "/a", "a")]))
    with serving(cfg) as sp, sp.client() as c:
        v1 = c.get("/config", headers=headers).json()["version"]

        write_doc(
            cfg, config_doc(data, {"a": dead}, [route("a", "/a", "a"), route("b", "/b", "a")])
        )
        sp.proc.send_signal(signal.SIGHUP)
        v2 = _poll_version(c, headers, v1, timeout=10)
        assert v2 != v1, sp.stderr()
        info = c.get("/config", headers=headers).json()
        assert info["reloads"] == 1
        assert [h["version"] for h in info["history"]] == [v2, v1]
        names = [x["name"] for x in c.get("/routes", headers=headers).json()["items"]]
        assert names == ["a", "b"]
        audit = c.get("/audit", params={"action": "config.reload"}, headers=headers).json()
        assert [e["actor_id"] for e in audit["items"]] == ["signal:SIGHUP"]

        # A bad file: logged, nothing changes, the process keeps running.
        write_doc(
            cfg,
            config_doc(data, {"a": dead}, [route("a", "/a", "a", plugins={"no-such-plugin": {}})]),
        )
        sp.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "no-such-plugin" not in sp.stderr() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "no-such-plugin" in sp.stderr(), sp.stderr()
        assert sp.running
        info = c.get("/config", headers=headers).json()
        assert info["version"] == v2 and info["reloads"] == 1
        assert c.get("/health").status_code == 200

        # Not TOML: same.
        cfg.write_text("routes = [\n")
        sp.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "invalid TOML" not in sp.stderr() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "invalid TOML" in sp.stderr(), sp.stderr()
        assert sp.running
        assert c.get("/config", headers=headers).json()["version"] == v2
        c.close()
        assert sp.stop() == 0, sp.stderr()
    assert "Traceback" not in sp.stderr(), sp.stderr()


# ---- shutdown ---------------------------------------------------------------------------


async def new_connection_outcome(url: str) -> str:
    """What a new connection gets while the server drains: ``"refused"`` is
    right; anything else is what went wrong instead."""
    with trio.move_on_after(0.5):
        try:
            async with httpx.AsyncClient(base_url=url, timeout=5) as c:
                r = await c.get("/fast")
        except httpx.ConnectError:
            return "refused"
        except httpx.HTTPError as exc:
            return f"accepted during shutdown, then {exc!r}"
        return f"served during shutdown: {r.status_code}"
    return "accepted during shutdown and left hanging (not refused)"


async def test_shutdown_lets_an_in_flight_request_finish(tmp_path: Path) -> None:
    slow = FakeUpstream(handler=slow_on_slow_path)
    async with upstreams(slow):
        cfg = tmp_path / "gw.toml"
        data = tmp_path / "data"
        auth_route: dict[str, Any] = {"key-auth": {}}
        rs = [
            route("slow", "/slow", "a", plugins=auth_route),
            route("fast", "/fast", "a", plugins=auth_route),
        ]
        # Usage reaches LMDB only by the final flush.
        storage = {"flush_interval_seconds": 3600}
        write_doc(cfg, config_doc(data, {"a": slow.url}, rs, storage=storage))

        server = Server(load_config(cfg), source=str(cfg))
        async with trio.open_nursery() as nursery:
            info = await nursery.start(server.run)
            assert server.gateway is not None
            gw = server.gateway
            created = await gw.keys.create(CreateKeyRequest(name="k", owner="o"), Actor("test"))
            auth = {"Authorization": f"Bearer {created.key}"}
            results: list[httpx.Response] = []

            async def in_flight() -> None:
                async with httpx.AsyncClient(base_url=info.proxy_url, timeout=10) as c:
                    results.append(await c.get("/slow", headers=auth))

            async with httpx.AsyncClient(base_url=info.proxy_url, timeout=10) as c:
                for _ in range(3):
                    r = await c.get("/fast", headers=auth)
                    assert r.status_code == 200, r.text
            nursery.start_soon(in_flight)
            await eventually(lambda: len(slow.requests) == 4)
            started = trio.current_time()
            server.shutdown()
            await trio.sleep(0.05)
            assert not results
            new_connection = await new_connection_outcome(info.proxy_url)
            with trio.fail_after(5):
                await server.stopped.wait()
            elapsed = trio.current_time() - started
            assert len(results) == 1
            assert results[0].status_code == 200, results[0].text
            assert results[0].content == b"finished"
            assert elapsed < 2.5, elapsed  # the request's time, not the whole grace
            nursery.cancel_scope.cancel()

        # After a restart: the 4 requests were flushed on the way out.
        async with open_gateway(load_config(cfg)) as again:
            usage = again.keys.usage(created.id)
            assert usage.requests == 4, usage
            assert usage.by_status_class["2xx"] == 4, usage
        # A connection attempted while draining must be refused, not accepted
        # into the listen backlog and left waiting for the in-flight requests.
        assert new_connection == "refused"


async def test_shutdown_cuts_a_request_longer_than_the_grace(tmp_path: Path) -> None:
    slow = FakeUpstream([FakeResponse(200, body=b"too late", delay=5.0)])
    async with upstreams(slow):
        cfg = tmp_path / "gw.toml"
        rs = [route("slow", "/slow", "a")]
        server_cfg = {"shutdown_grace_seconds": 0.5}
        write_doc(cfg, config_doc(tmp_path / "data", {"a": slow.url}, rs, server=server_cfg))
        server = Server(load_config(cfg), source=str(cfg))
        outcome: list[str] = []
        async with trio.open_nursery() as nursery:
            info = await nursery.start(server.run)

            async def in_flight() -> None:
                async with httpx.AsyncClient(base_url=info.proxy_url, timeout=10) as c:
                    try:
                        r = await c.get("/slow")
                    except httpx.HTTPError as exc:
                        outcome.append(type(exc).__name__)
                    else:
                        outcome.append(str(r.status_code))

            nursery.start_soon(in_flight)
            await eventually(lambda: len(slow.requests) == 1)
            started = trio.current_time()
            server.shutdown()
            with trio.fail_after(3):
                await server.stopped.wait()
            elapsed = trio.current_time() - started
            await eventually(lambda: bool(outcome))
            nursery.cancel_scope.cancel()
        assert 0.4 < elapsed < 1.5, elapsed
        assert outcome and outcome[0] != "200", outcome


async def test_sigterm_drains_in_flight_requests_and_exits_zero(tmp_path: Path) -> None:
    slow = FakeUpstream(handler=slow_on_slow_path)
    async with upstreams(slow):
        data = tmp_path / "data"
        key = await trio.to_thread.run_sync(
            _cli_json, "keys", "create", "--data-dir", str(data), "--name", "k", "--owner", "o",
            "--json",
        )  # fmt: skip
        auth = {"Authorization": f"Bearer {key['key']}"}
        cfg = tmp_path / "gw.toml"
        rs = [
            route("slow", "/slow", "a", plugins={"key-auth": {}}),
            route("fast", "/fast", "a", plugins={"key-auth": {}}),
        ]
        storage = {"flush_interval_seconds": 3600}
        write_doc(cfg, config_doc(data, {"a": slow.url}, rs, storage=storage))
        sp = await trio.to_thread.run_sync(start_serve, cfg)
        try:
            proxy_url = sp.proxy_url
            results: list[httpx.Response] = []

            async def in_flight() -> None:
                async with httpx.AsyncClient(base_url=proxy_url, timeout=10) as c:
                    results.append(await c.get("/slow", headers=auth))

            async with trio.open_nursery() as nursery:
                async with httpx.AsyncClient(base_url=proxy_url, timeout=10) as c:
                    for _ in range(2):
                        r = await c.get("/fast", headers=auth)
                        assert r.status_code == 200, r.text
                nursery.start_soon(in_flight)
                await eventually(lambda: len(slow.requests) == 3)
                started = time.monotonic()
                sp.proc.send_signal(signal.SIGTERM)
                await trio.sleep(0.2)
                assert not results
                assert sp.running
                new_connection = await new_connection_outcome(proxy_url)
            assert len(results) == 1
            assert results[0].status_code == 200, results[0].text
            assert results[0].content == b"finished"
            rc = await trio.to_thread.run_sync(sp.proc.wait, 10)
            assert rc == 0, sp.stderr()
            assert time.monotonic() - started < 3, sp.stderr()
        finally:
            sp.kill()
        assert "Traceback" not in sp.stderr(), sp.stderr()

        # Restart: the usage was flushed before the process exited.
        async with open_gateway(load_config(cfg)) as again:
            usage = again.keys.usage(key["id"])
            assert usage.requests == 3, usage
            assert usage.by_status_class["2xx"] == 3, usage
        assert new_connection == "refused"
