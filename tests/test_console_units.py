"""The console's sans-IO parts: sessions (idle expiry, the bound, a revoked
admin's sessions, CSRF, the key shown once), form reshaping, the chart's
data, the vendored files' hashes, and the dispatcher refusing exactly what
the admin API refuses (same permission, same error)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from triogate.admin.endpoints import ENDPOINTS
from triogate.console import forms
from triogate.console.dispatch import Dispatcher
from triogate.console.pages_keys import OUTCOMES, chart_data
from triogate.console.sessions import SessionStore
from triogate.control.admins import Principal
from triogate.control.permissions import ROLES, grants
from triogate.errors import Forbidden, ValidationError
from triogate.runtime.gateway import Gateway

STATIC = Path(__file__).resolve().parent.parent / "core" / "console" / "static"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def store(clock: Clock, idle: float = 60.0, **kw: int) -> SessionStore:
    return SessionStore(clock, lambda: idle, **kw)


# ---- sessions -------------------------------------------------------------------------


def test_a_session_lives_while_used_and_ends_after_its_idle_time() -> None:
    clock = Clock()
    sessions = store(clock)
    s = sessions.create("tgadm_x", "adm_1")
    clock.now += 59
    assert sessions.get(s.id) is s  # used: its idle clock restarts
    clock.now += 59
    assert sessions.get(s.id) is s
    clock.now += 61
    assert sessions.get(s.id) is None
    assert len(sessions) == 0  # dropped, not kept around
    assert sessions.get(None) is None and sessions.get("") is None
    assert sessions.get("made-up") is None


def test_ids_and_csrf_tokens_are_random_and_long() -> None:
    sessions = store(Clock())
    a, b = sessions.create("k", "adm_1"), sessions.create("k", "adm_1")
    assert a.id != b.id and a.csrf != b.csrf and a.id != a.csrf
    assert len(a.id) >= 40 and len(a.csrf) >= 40
    secret = sessions.create("tgadm_SECRETVALUE", "adm_1")
    # Neither the key nor the tokens in a repr (logs, tracebacks).
    assert all(v not in repr(secret) for v in ("SECRETVALUE", secret.id, secret.csrf))


def test_the_store_is_bounded_least_recently_used_first() -> None:
    clock = Clock()
    sessions = store(clock, max_sessions=3)
    first, second, third = (sessions.create("k", f"adm_{i}") for i in range(3))
    assert sessions.get(first.id) is first  # now the most recently used
    sessions.create("k", "adm_9")
    assert len(sessions) == 3
    assert sessions.get(second.id) is None
    assert sessions.get(first.id) is first and sessions.get(third.id) is third


def test_drop_admin_ends_every_session_of_that_admin_only() -> None:
    sessions = store(Clock())
    mine = [sessions.create("k", "adm_1") for _ in range(3)]
    other = sessions.create("k2", "adm_2")
    assert sessions.drop_admin("adm_1") == 3
    assert all(sessions.get(s.id) is None for s in mine)
    assert sessions.get(other.id) is other
    sessions.drop(other.id)
    assert sessions.get(other.id) is None


def test_csrf_check_and_the_key_shown_once() -> None:
    s = store(Clock()).create("k", "adm_1")
    assert s.csrf_ok(s.csrf)
    assert not s.csrf_ok(None) and not s.csrf_ok("") and not s.csrf_ok(s.csrf + "x")
    assert not s.csrf_ok(s.id)
    s.reveal = ("key_1", "tg_secret")
    assert s.pop_reveal("key_2") is None  # another key's page shows nothing
    assert s.pop_reveal("key_1") == "tg_secret"
    assert s.pop_reveal("key_1") is None  # once
    s.flash = ("ok", "done")
    assert s.pop_flash() == ("ok", "done") and s.pop_flash() is None


# ---- forms ----------------------------------------------------------------------------


def test_create_form_to_body_leaves_empty_fields_out() -> None:
    body = forms.create_key_body(
        {
            "name": " erp ",
            "owner": "acme",
            "scopes": "orders:read, users:*  billing:read",
            "rate_limits": "minute 100 60\n\nburst 5 1.5 sliding_window\n",
            "credits_remaining": "1000",
            "credits_refill_amount": "1000",
            "credits_refill_interval_seconds": "",
            "expires_at": "",
            "plan_id": "pln_1",
            "csrf": "ignored",
        }
    )
    assert body == {
        "name": "erp",
        "owner": "acme",
        "scopes": ["orders:read", "users:*", "billing:read"],
        "rate_limits": [
            {"name": "minute", "limit": 100, "period_seconds": 60.0},
            {"name": "burst", "limit": 5, "period_seconds": 1.5, "algorithm": "sliding_window"},
        ],
        "credits": {"remaining": 1000, "refill_amount": 1000},
        "plan_id": "pln_1",
    }
    assert forms.create_key_body({"name": "a", "owner": "b"}) == {"name": "a", "owner": "b"}


@pytest.mark.parametrize(
    ("form", "path"),
    [
        ({"rate_limits": "minute 100"}, "rate_limits[0]"),
        ({"rate_limits": "a 1 1\nminute x 60"}, "rate_limits[1].limit"),
        ({"rate_limits": "minute 10 soon"}, "rate_limits[0].period_seconds"),
        ({"credits_remaining": "lots"}, "credits.remaining"),
    ],
)
def test_a_field_that_cannot_be_reshaped_is_named(form: dict[str, str], path: str) -> None:
    with pytest.raises(ValidationError) as caught:
        forms.create_key_body({"name": "a", "owner": "b", **form})
    assert [e.path for e in caught.value.errors] == [path]


def test_patch_rotate_and_credit_forms() -> None:
    assert forms.patch_key_body({"name": "n", "scopes": "a b", "rate_limits": ""}) == {
        "name": "n",
        "scopes": ["a", "b"],
        "rate_limits": [],
        "expires_at": None,  # empty clears it
        "metadata": None,  # so does empty metadata
        "enabled": False,  # an unticked checkbox is not sent
    }
    assert forms.patch_key_body({"name": "n", "enabled": "on"})["enabled"] is True
    assert forms.rotate_body({"grace_seconds": "60"}) == {"grace_seconds": 60}
    assert forms.rotate_body({"grace_seconds": " "}) == {}
    assert forms.credits_body({"op": "increment", "amount": "5"}) == {
        "op": "increment",
        "amount": 5,
    }
    with pytest.raises(ValidationError):
        forms.rotate_body({"grace_seconds": "1d"})


def test_limits_text_reads_back_as_the_same_limits() -> None:
    limits = [
        {"name": "minute", "limit": 100, "period_seconds": 60.0, "algorithm": "gcra"},
        {"name": "ms", "limit": 1, "period_seconds": 0.25, "algorithm": "sliding_window"},
    ]
    assert forms.rate_limits(forms.limits_text(limits)) == limits


def test_chart_data_has_one_series_per_outcome_on_one_axis() -> None:
    item = {name: i for i, name in enumerate(OUTCOMES, 1)}
    history = {
        "granularity": "hour",
        "items": [
            {"start": "2027-01-01T00:00:00Z", "total": 15, **item},
            {"start": "2027-01-01T01:00:00Z", "total": 15, **item},
        ],
    }
    data = chart_data(history)
    assert data["x"] == [1798761600, 1798765200]
    assert [s["name"] for s in data["series"]] == list(OUTCOMES)
    assert data["series"][3] == {"name": "invalid", "values": [4, 4]}
    assert chart_data({"granularity": "day", "items": []})["x"] == []
    # The span's empty buckets are zeros: a time axis without gaps.
    spanned = chart_data({**history, "from": "2026-12-31T22:00:00Z", "to": "2027-01-01T03:30:00Z"})
    assert spanned["x"] == [1798761600 + h * 3600 for h in range(-2, 4)]
    assert spanned["series"][0] == {"name": "allowed", "values": [0, 0, 1, 1, 0, 0]}


# ---- the vendored files ---------------------------------------------------------------


def test_the_vendored_files_are_the_ones_the_readme_names() -> None:
    readme = (STATIC / "README.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \|.*\| `([0-9a-f]{64})` \|$", readme, re.MULTILINE)
    assert {name for name, _ in rows} == {"htmx.min.js", "uplot.iife.min.js", "uplot.min.css"}
    for name, digest in rows:
        assert hashlib.sha256((STATIC / name).read_bytes()).hexdigest() == digest, name


def test_no_template_has_an_inline_script_or_style() -> None:
    templates = sorted((STATIC.parent / "templates").glob("*.html"))
    assert "base.html" in {p.name for p in templates}  # the loop checks the real folder
    for path in templates:
        text = path.read_text()
        for m in re.finditer(r"<script\b([^>]*)>", text):
            attrs = m.group(1)
            assert "src=" in attrs or 'type="application/json"' in attrs, (path.name, attrs)
        assert "<style" not in text and " style=" not in text, path.name
        assert not re.search(r"\son[a-z]+=", text), path.name  # no onclick=...


# ---- the dispatcher refuses what the API refuses --------------------------------------


@pytest.mark.parametrize("role", sorted(ROLES))
async def test_the_dispatcher_checks_each_endpoints_permission(
    memory_gateway: Gateway, role: str
) -> None:
    api = Dispatcher(memory_gateway)
    principal = Principal("adm_test", ROLES[role])
    assert ENDPOINTS  # the loop below checks something
    for ep in ENDPOINTS:
        if ep.permission is None:
            assert api.may(principal, ep.method, ep.path)
            continue
        allowed = grants(ROLES[role], ep.permission)
        assert api.may(principal, ep.method, ep.path) is allowed
        if allowed:
            continue
        with pytest.raises(Forbidden) as caught:
            await api.call(
                principal, ep.method, ep.path, source_ip=None, params={"id": "x"}, body={}
            )
        assert caught.value.extra == {"required_permission": ep.permission}
