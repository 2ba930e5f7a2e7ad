"""Events and webhooks with real processes: ``triogate serve`` delivering
to a webhook receiver on 127.0.0.1 (``helpers_webhooks``), over real HTTP,
from a real LMDB outbox.

* ``key.created``, ``credits.low``, ``rate_limit.exceeded`` and
  ``key.expired`` arrive, signed (the test verifies every signature);
* a receiver that is down loses nothing: events made while it is down,
  and across a gateway restart, arrive once it is back on the same port;
* a receiver answering 500, one that times out and one that redirects to
  itself are retried with back-off until ``max_attempts`` (failed, in the
  delivery log with their attempts), never blocking requests; a failed
  delivery is delivered by ``POST /events/deliveries/{id}/retry``;
* a secret too short is a config error ``triogate check-config`` reports.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers_process import ServeProcess, free_ports, run_cli, serving, threaded_upstream
from tests.helpers_webhooks import Receiver, wait_for

SECRET = "whsec_" + "s3cr3t-for-tests-0123456789abcdef"
OTHER_SECRET = "another-secret-of-32-characters-or-more!"


@pytest.fixture
def upstream() -> Iterator[str]:
    with threaded_upstream() as url:
        yield url


def _config(
    tmp_path: Path,
    upstream: str,
    hooks: list[tuple[str, str, list[str]]],
    *,
    max_attempts: int = 30,
) -> Path:
    """A gateway proxying every path with key-auth, and ``hooks`` as
    (name, url, events), all signed with SECRET; short back-off."""
    webhooks = "".join(
        f"""
[[events.webhooks]]
name = "{name}"
url = "{url}"
events = {events!r}
secret = "{SECRET}"
""".replace("'", '"')
        for name, url, events in hooks
    )
    path = tmp_path / "events.toml"
    path.write_text(
        f"""
[server]
proxy_listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
data_dir = "{tmp_path / "data"}"
shutdown_grace_seconds = 2

[storage]
flush_interval_seconds = 0.2

[events]
timeout_seconds = 0.5
retry_base_seconds = 0.2
retry_max_seconds = 0.8
max_attempts = {max_attempts}
{webhooks}
[upstreams.echo]
targets = ["{upstream}"]

[[routes]]
name = "api"
path = "/{{rest:path}}"
upstream = "echo"
[routes.plugins]
key-auth = {{}}
"""
    )
    return path


@contextmanager
def _admin(proc: ServeProcess, tmp_path: Path) -> Iterator[httpx.Client]:
    """An admin client: the root made by /setup (its key kept in a file
    for the next start on the same data)."""
    saved = tmp_path / "root-key"
    with proc.client() as client:
        r = client.post("/setup", json={"name": "root", "email": "root@example.com"})
        if r.status_code == 201:
            saved.write_text(r.json()["key"])
        client.headers["Authorization"] = f"Bearer {saved.read_text()}"
        yield client


def _create(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    r = client.post("/keys", json={"name": "k", "owner": "o", **fields})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def _deliveries(client: httpx.Client, **query: str) -> list[dict[str, Any]]:
    r = client.get("/events/deliveries", params={"limit": 100, **query})
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def test_signed_events_arrive(tmp_path: Path, upstream: str) -> None:
    with Receiver() as receiver:
        events = ["key.created", "credits.low", "rate_limit.exceeded", "key.expired"]
        config = _config(tmp_path, upstream, [("shop", receiver.url, events)])
        with serving(config) as proc, _admin(proc, tmp_path) as admin:
            metered = _create(admin, credits={"remaining": 10})
            limited = _create(admin, rate_limits=[{"name": "m", "limit": 1, "period_seconds": 60}])
            soon = datetime.now(UTC) + timedelta(seconds=1)
            expiring = _create(admin, expires_at=soon.isoformat())
            wait_for(lambda: len(receiver.events("key.created")) == 3, "three key.created")

            created = receiver.events("key.created")
            assert {e["data"]["key_id"] for e in created} == {
                metered["id"],
                limited["id"],
                expiring["id"],
            }
            for delivery in receiver.deliveries():
                assert delivery.path == "/hook"
                assert delivery.signed_by(SECRET), delivery.headers
                assert not delivery.signed_by(OTHER_SECRET)
                assert delivery.headers["content-type"] == "application/json"
                event = delivery.json()
                assert event["id"].startswith("evt_")
                assert delivery.headers["triogate-event-id"] == event["id"]
                # No secret ever: neither the key nor its owner.
                assert metered["key"].encode() not in delivery.body
                assert b'"o"' not in delivery.body

            with httpx.Client(base_url=proc.proxy_url, timeout=10) as proxy:
                key = {"x-api-key": metered["key"]}
                # 10 credits, credits.low at 20% (2) and at 0.
                assert [proxy.get("/x", headers=key).status_code for _ in range(11)] == [
                    200
                ] * 10 + [429]
                lim = {"x-api-key": limited["key"]}
                assert [proxy.get("/x", headers=lim).status_code for _ in range(4)] == [
                    200,
                    429,
                    429,
                    429,
                ]
                wait_for(lambda: datetime.now(UTC) > soon + timedelta(seconds=0.2), "the expiry")
                r = proxy.get("/x", headers={"x-api-key": expiring["key"]})
                assert r.status_code == 401 and r.json()["code"] == "KEY_EXPIRED"
                proxy.get("/x", headers={"x-api-key": expiring["key"]})

            wait_for(lambda: len(receiver.events("credits.low")) == 2, "two credits.low")
            wait_for(lambda: receiver.events("key.expired"), "key.expired")
            wait_for(lambda: receiver.events("rate_limit.exceeded"), "rate_limit.exceeded")
            low = sorted(receiver.events("credits.low"), key=lambda e: -e["data"]["remaining"])
            assert [(e["data"]["threshold_percent"], e["data"]["remaining"]) for e in low] == [
                (20, 2),
                (0, 0),
            ]
            assert all(e["data"]["key_id"] == metered["id"] for e in low)
            assert low[0]["data"]["reference"] == 10
            # Once per key per minute, however many refusals.
            limited_events = receiver.events("rate_limit.exceeded")
            assert [e["data"]["key_id"] for e in limited_events] == [limited["id"]]
            expired = receiver.events("key.expired")
            assert [e["data"]["key_id"] for e in expired] == [expiring["id"]]
            assert expired[0]["data"]["status"] == "expired"
            assert all(d.signed_by(SECRET) for d in receiver.deliveries())

            log = _deliveries(admin, status="delivered")
            assert len(log) == len(receiver.deliveries())
            assert all(d["attempts"][-1]["status_code"] == 204 for d in log)
            assert _deliveries(admin, event="key.expired")[0]["key_id"] == expiring["id"]
            assert _deliveries(admin, webhook="nobody") == []
            assert proc.stop() == 0


def test_a_receiver_down_loses_nothing_across_a_restart(tmp_path: Path, upstream: str) -> None:
    (port,) = free_ports(1)
    receiver = Receiver(port=port)  # not started: down
    config = _config(tmp_path, upstream, [("shop", receiver.url, ["key.created"])])
    ids: list[str] = []
    with serving(config) as proc, _admin(proc, tmp_path) as admin:
        ids += [_create(admin)["id"] for _ in range(3)]
        # Tried and failed: the attempts are in the log, the events pending.
        wait_for(
            lambda: all(d["attempts"] for d in _deliveries(admin)) and _deliveries(admin),
            "first attempts",
        )
        pending = _deliveries(admin, status="pending")
        assert len(pending) == 3
        assert all(d["last_status_code"] is None and d["last_error"] for d in pending)
        assert all(d["next_attempt_at"] is not None for d in pending)
        # Nothing waits for the receiver: the admin API and the proxy answer.
        with httpx.Client(base_url=proc.proxy_url, timeout=10) as proxy:
            key = _create(admin)
            ids.append(key["id"])
            assert proxy.get("/x", headers={"x-api-key": key["key"]}).status_code == 200
        assert proc.stop() == 0
    # Keys made by the CLI while no gateway runs go to the outbox too.
    made = run_cli(
        "keys", "create", "-c", str(config), "--name", "cli", "--owner", "o", "--json"
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    ids.append(__import__("json").loads(made.stdout)["id"])

    with serving(config) as proc, _admin(proc, tmp_path) as admin:
        assert len(_deliveries(admin, status="pending")) == 5
        with receiver:  # back, on the same port
            wait_for(lambda: len(receiver.events("key.created")) == 5, "five key.created")
            wait_for(lambda: len(_deliveries(admin, status="delivered")) == 5, "all delivered")
        assert sorted(e["data"]["key_id"] for e in receiver.events()) == sorted(ids)
        assert all(d.signed_by(SECRET) for d in receiver.deliveries())
        assert proc.stop() == 0


def test_bad_receivers_are_retried_with_back_off_and_fail(tmp_path: Path, upstream: str) -> None:
    with (
        Receiver("error") as error,
        Receiver("slow") as slow,
        Receiver("redirect") as redirect,
        Receiver() as good,
    ):
        hooks = [
            ("error", error.url, ["key.created"]),
            ("slow", slow.url, ["key.created"]),
            ("redirect", redirect.url, ["key.created"]),
            ("good", good.url, ["key.created"]),
        ]
        config = _config(tmp_path, upstream, hooks, max_attempts=3)
        with serving(config) as proc, _admin(proc, tmp_path) as admin:
            key = _create(admin)
            wait_for(lambda: len(good.events()) == 1, "the good receiver's event")
            wait_for(
                lambda: len(_deliveries(admin, status="failed")) == 3,
                "three failed deliveries",
                timeout=30,
            )
            by_hook = {d["webhook"]: d for d in _deliveries(admin)}
            assert by_hook["good"]["status"] == "delivered"
            for name in ("error", "slow", "redirect"):
                delivery = by_hook[name]
                assert delivery["status"] == "failed"
                assert delivery["next_attempt_at"] is None
                assert len(delivery["attempts"]) == 3, delivery
                assert delivery["event"]["data"]["key_id"] == key["id"]
            assert {a["status_code"] for a in by_hook["error"]["attempts"]} == {500}
            assert all("timed out" in a["error"] for a in by_hook["slow"]["attempts"])
            assert all(
                a["status_code"] == 302 and "redirect" in a["error"]
                for a in by_hook["redirect"]["attempts"]
            )
            # Redirects are not followed: one request per attempt, no more.
            assert len(redirect.deliveries()) == 3
            assert len(error.deliveries()) == 3
            # Back-off: the attempts are spaced (never asserting how much).
            times = [a["at"] for a in by_hook["error"]["attempts"]]
            assert times == sorted(times) and len(set(times)) == 3
            # Requests never waited for any of them.
            with httpx.Client(base_url=proc.proxy_url, timeout=10) as proxy:
                assert proxy.get("/x", headers={"x-api-key": key["key"]}).status_code == 200

            # A manual retry of a failed delivery, the receiver fixed.
            error.mode = "ok"
            failed_id = by_hook["error"]["id"]
            r = admin.post(f"/events/deliveries/{failed_id}/retry")
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "pending"
            again = admin.post(f"/events/deliveries/{failed_id}/retry")
            assert again.status_code in (200, 409)  # 409 while still pending
            wait_for(
                lambda: (
                    admin.get(f"/events/deliveries/{failed_id}").json()["status"] == "delivered"
                ),
                "the retried delivery",
            )
            assert error.deliveries()[-1].signed_by(SECRET)
            assert admin.get("/events/deliveries/dlv_nope").status_code == 400
            audit = admin.get("/audit", params={"action": "event.retry"}).json()["items"]
            assert [a["target_id"] for a in audit][-1] == failed_id
            assert proc.stop() == 0


def test_a_secret_too_short_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "short.toml"
    path.write_text(
        """
[[events.webhooks]]
url = "http://127.0.0.1:9/hook"
events = ["key.created"]
secret = "too-short"

[[events.webhooks]]
url = "ftp://127.0.0.1:9/hook"
events = ["key.nope"]
secret = "long-enough-long-enough-long-enough"
"""
    )
    result = run_cli("check-config", str(path))
    assert result.returncode != 0
    assert "events.webhooks[0].secret" in result.stderr + result.stdout
    assert "events.webhooks[1].url" in result.stderr + result.stdout
    assert "events.webhooks[1].events" in result.stderr + result.stdout
    # From the environment, as any setting: long enough there, it loads.
    env = {"TRIOGATE_EVENTS__WEBHOOKS__0__SECRET": "x" * 32}
    path.write_text(
        """
[[events.webhooks]]
url = "http://127.0.0.1:9/hook"
events = ["key.created"]
secret = "too-short"
"""
    )
    assert run_cli("check-config", str(path), env=env).returncode == 0
