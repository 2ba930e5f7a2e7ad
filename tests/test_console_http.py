"""The console over plain HTTP (no browser), against the real server
(hypercorn admin listener, LMDB): sessions, CSRF, permissions, headers, the
config switch, and every page rendering from the admin API's data."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio

from tests.conftest import Admin, Running
from triogate.config import parse_config
from triogate.console.web import COOKIE, CSP
from triogate.runtime.server import Server

_CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')
_LOGIN_RE = re.compile(r'name="login_csrf" value="([^"]+)"')


async def post_login(client: httpx.AsyncClient, key: str) -> httpx.Response:
    """Sign in as the form does: load it (its token and cookie), then post."""
    page = await client.get("/ui/login")
    m = _LOGIN_RE.search(page.text)
    assert m, page.text
    return await client.post("/ui/login", data={"key": key, "login_csrf": m.group(1)})


async def make_admin(running: Running, root: Admin, role: str) -> Admin:
    r = await running.client.post(
        "/admins",
        json={"name": role, "email": f"{role}@example.com", "role": role},
        headers=root.headers,
    )
    assert r.status_code == 201, r.text
    return Admin(r.json()["id"], r.json()["key"])


@asynccontextmanager
async def sign_in(running: Running, key: str) -> AsyncIterator[httpx.AsyncClient]:
    """A new client (its own cookie jar) signed in to the console."""
    async with httpx.AsyncClient(base_url=running.info.admin_url, timeout=10) as client:
        r = await post_login(client, key)
        assert r.status_code == 303, r.text
        assert r.headers["location"] == "/ui/"
        yield client


def csrf_of(html: str) -> str:
    m = _CSRF_RE.search(html)
    assert m, html
    return m.group(1)


async def audit_actions(running: Running, root: Admin) -> list[str]:
    r = await running.client.get("/audit", headers=root.headers)
    return [e["action"] for e in r.json()["items"]]


@pytest.fixture
async def console(running: Running, root: Admin) -> AsyncIterator[httpx.AsyncClient]:
    async with sign_in(running, root.key) as client:
        yield client


async def test_pages_need_a_session(running: Running, root: Admin) -> None:
    c = running.client
    for path in ("/ui/", "/ui/keys", "/ui/audit", "/ui/keys/key_x", "/ui/config"):
        r = await c.get(path)
        assert r.status_code == 302, (path, r.status_code)
        assert r.headers["location"] == "/ui/login", path
    r = await c.post("/ui/keys", data={"name": "a", "owner": "b"})
    assert r.status_code == 403 and r.json()["code"] == "FORBIDDEN"
    async with httpx.AsyncClient(
        base_url=running.info.admin_url, cookies={COOKIE: "forged-session-id"}
    ) as forged:
        r = await forged.get("/ui/keys")
        assert r.status_code == 302 and r.headers["location"] == "/ui/login"


async def test_a_bad_key_is_refused_with_a_message_and_no_session(running: Running) -> None:
    c = running.client
    for key, reason in (("", "required"), ("nonsense", "malformed"), ("tgadm_" + "A" * 40, "")):
        r = await post_login(c, key)
        assert r.status_code == 401, r.text
        assert COOKIE not in c.cookies
        assert 'id="login-error"' in r.text and reason in r.text
        assert r.headers["content-security-policy"] == CSP
    assert COOKIE not in c.cookies


async def test_signing_in_sets_a_strict_cookie_and_never_echoes_the_key(
    running: Running, root: Admin
) -> None:
    c = running.client
    r = await post_login(c, root.key)
    assert r.status_code == 303 and r.headers["location"] == "/ui/"
    cookie = next(v for v in r.headers.get_list("set-cookie") if v.startswith(f"{COOKIE}="))
    assert cookie.startswith(f"{COOKIE}=")
    attrs = {a.strip().lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/ui"} <= attrs
    assert "secure" not in attrs  # plain HTTP here; over TLS it is Secure
    assert root.key not in cookie and root.key not in r.headers["location"]
    r = await c.get("/ui/keys")
    assert r.status_code == 200 and root.key not in r.text


async def test_security_headers_on_every_console_answer(
    console: httpx.AsyncClient, running: Running
) -> None:
    for path in ("/ui/keys", "/ui/login", "/ui/static/console.js", "/ui/audit"):
        r = await console.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-security-policy"] == CSP
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
        if not path.startswith("/ui/static/"):
            assert r.headers["cache-control"] == "no-store"
    assert "default-src 'self'" in CSP and "unsafe" not in CSP
    r = await console.get("/ui/static/htmx.min.js")
    assert r.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    r = await console.get("/ui/static/uplot.min.css")
    assert r.headers["content-type"].startswith("text/css")
    # The JSON API is not the console: no console headers there.
    r = await running.client.get("/health")
    assert "content-security-policy" not in r.headers


async def test_every_write_needs_the_sessions_csrf_token(
    console: httpx.AsyncClient, running: Running, root: Admin
) -> None:
    before = await audit_actions(running, root)
    for data in ({}, {"csrf": ""}, {"csrf": "wrong"}):
        r = await console.post("/ui/keys", data={"name": "a", "owner": "b", **data})
        assert r.status_code == 403, r.text
        assert r.json()["code"] == "FORBIDDEN" and "CSRF" in r.json()["detail"]
    # Another session's token is not this session's.
    async with sign_in(running, root.key) as other:
        foreign = csrf_of((await other.get("/ui/keys")).text)
    r = await console.post("/ui/keys", data={"name": "a", "owner": "b", "csrf": foreign})
    assert r.status_code == 403
    assert await audit_actions(running, root) == before
    # The right token in a header works as well as in the form.
    token = csrf_of((await console.get("/ui/keys")).text)
    r = await console.post(
        "/ui/keys", data={"name": "a", "owner": "b"}, headers={"X-CSRF-Token": token}
    )
    assert r.status_code == 303, r.text


async def test_create_shows_the_key_once_then_rotate_and_revoke_are_audited(
    console: httpx.AsyncClient, running: Running, root: Admin
) -> None:
    token = csrf_of((await console.get("/ui/keys")).text)
    r = await console.post(
        "/ui/keys",
        data={
            "csrf": token,
            "name": "erp",
            "owner": "acme",
            "rate_limits": "minute 100 60",
            "credits_remaining": "500",
        },
    )
    assert r.status_code == 303, r.text
    key_url = r.headers["location"]
    key_id = key_url.rsplit("/", 1)[1]
    page = (await console.get(key_url)).text
    plaintext = re.search(r'<code id="new-key">([^<]+)</code>', page)
    assert plaintext, page
    # It is the real key: the API validates it.
    r = await running.client.post(
        "/keys/validate", json={"key": plaintext.group(1)}, headers=root.headers
    )
    assert r.json()["valid"] is True and r.json()["key_id"] == key_id
    assert r.json()["credits_remaining"] == 500
    again = (await console.get(key_url)).text
    assert plaintext.group(1) not in again and 'id="new-key"' not in again
    assert 'id="usage-history"' in again and "minute" in again

    r = await console.post(f"{key_url}/rotate", data={"csrf": token, "grace_seconds": "60"})
    assert r.status_code == 303, r.text
    new_url = r.headers["location"]
    assert new_url != key_url
    page = (await console.get(new_url)).text
    assert 'id="new-key"' in page and "rotated" in page
    r = await console.post(f"{new_url}/revoke", data={"csrf": token})
    assert r.status_code == 303
    page = (await console.get(new_url)).text
    assert "revoked" in page and 'id="revoke"' not in page

    audit = (await console.get("/ui/audit")).text
    assert 'data-action="key.rotate"' in audit and 'data-action="key.revoke"' in audit
    filtered = (await console.get("/ui/audit", params={"action": "key.revoke"})).text
    assert 'data-action="key.revoke"' in filtered and 'data-action="key.rotate"' not in filtered
    actions = await audit_actions(running, root)
    assert actions[:3] == ["key.revoke", "key.rotate", "key.create"]


async def test_a_refused_field_comes_back_as_a_message(
    console: httpx.AsyncClient, running: Running, root: Admin
) -> None:
    token = csrf_of((await console.get("/ui/keys")).text)
    for data in (
        {"name": "", "owner": "acme"},
        {"name": "x", "owner": "acme", "rate_limits": "minute 0 60"},
        {"name": "x", "owner": "acme", "rate_limits": "minute lots 60"},
    ):
        r = await console.post("/ui/keys", data={"csrf": token, **data})
        assert r.status_code == 303 and r.headers["location"] == "/ui/keys"
        page = (await console.get("/ui/keys")).text
        assert 'class="flash error"' in page, data
    assert "key.create" not in await audit_actions(running, root)


async def test_a_viewer_sees_no_write_buttons_and_a_forged_write_is_refused(
    running: Running, root: Admin
) -> None:
    viewer = await make_admin(running, root, "key_viewer")
    r = await running.client.post("/keys", json={"name": "k", "owner": "o"}, headers=root.headers)
    key_id = r.json()["id"]
    before = await audit_actions(running, root)
    async with sign_in(running, viewer.key) as c:
        page = (await c.get("/ui/keys")).text
        assert key_id in page
        assert 'id="create-key"' not in page and 'action="/ui/keys"' in page  # search only
        key_page = (await c.get(f"/ui/keys/{key_id}")).text
        for button in ('id="rotate"', 'id="revoke"', 'id="save"', 'id="credits"'):
            assert button not in key_page, button
        token = csrf_of(key_page)  # the sign-out form's token: a valid one
        for path, data in (
            ("/ui/keys", {"name": "x", "owner": "y"}),
            (f"/ui/keys/{key_id}/revoke", {}),
            (f"/ui/keys/{key_id}/rotate", {}),
            (f"/ui/keys/{key_id}/patch", {"name": "z"}),
            (f"/ui/keys/{key_id}/credits", {"op": "set", "amount": "1"}),
        ):
            for forged in (data, {**data, "csrf": token}):
                r = await c.post(path, data=forged)
                assert r.status_code == 403, (path, r.text)
                assert r.json()["code"] == "FORBIDDEN"
            assert r.json()["required_permission"].startswith("admin:keys:")
        # Pages it may not read: the API's 403, as a page.
        r = await c.get("/ui/audit")
        assert r.status_code == 403 and "admin:audit:read" in r.text
        assert 'href="/ui/audit"' not in r.text  # not in its navigation either
    assert await audit_actions(running, root) == before
    r = await running.client.get(f"/keys/{key_id}", headers=root.headers)
    assert r.json()["status"] == "active"


@pytest.mark.parametrize(
    ("role", "landing"),
    [("super_admin", "/ui/keys"), ("key_viewer", "/ui/keys"), ("auditor", "/ui/audit")],
)
async def test_signing_in_lands_on_a_page_the_admin_may_read(
    running: Running, root: Admin, role: str, landing: str
) -> None:
    admin = root if role == "super_admin" else await make_admin(running, root, role)
    async with sign_in(running, admin.key) as c:
        r = await c.get("/ui/")
        assert r.status_code == 302 and r.headers["location"] == landing
        assert (await c.get(landing)).status_code == 200


async def test_a_revoked_admin_loses_its_sessions_and_sign_out_ends_one(
    running: Running, root: Admin
) -> None:
    ops = await make_admin(running, root, "key_admin")
    async with sign_in(running, ops.key) as c:
        token = csrf_of((await c.get("/ui/keys")).text)
        r = await running.client.delete(f"/admins/{ops.id}", headers=root.headers)
        assert r.status_code == 200
        r = await c.get("/ui/keys")
        assert r.status_code == 302 and r.headers["location"] == "/ui/login?ended=1"
        r = await c.post("/ui/keys", data={"csrf": token, "name": "x", "owner": "y"})
        assert r.status_code == 403
        assert "key.create" not in await audit_actions(running, root)
        r = await post_login(c, ops.key)
        assert r.status_code == 401 and "revoked" in r.text
    async with sign_in(running, root.key) as c:
        token = csrf_of((await c.get("/ui/keys")).text)
        r = await c.post("/ui/logout", data={})
        assert r.status_code == 403  # sign-out is a write too
        r = await c.post("/ui/logout", data={"csrf": token})
        assert r.status_code == 303 and r.headers["location"] == "/ui/login"
        r = await c.get("/ui/keys")
        assert r.status_code == 302 and r.headers["location"] == "/ui/login"


async def test_every_page_renders_for_a_super_admin(
    console: httpx.AsyncClient, running: Running, root: Admin
) -> None:
    h = root.headers
    c = running.client
    plan = (await c.post("/plans", json={"name": "pro"}, headers=h)).json()
    ident = (
        await c.post("/identities", json={"external_id": "cus_1", "name": "Acme"}, headers=h)
    ).json()
    key = (
        await c.post(
            "/keys",
            json={"name": "k", "owner": "acme", "plan_id": plan["id"], "identity_id": ident["id"]},
            headers=h,
        )
    ).json()
    await c.post("/roles", json={"name": "reader", "scopes": ["a:read"]}, headers=h)
    pages = {
        "/ui/keys": key["id"],
        "/ui/keys?owner=acme&status=active": key["id"],
        f"/ui/keys/{key['id']}?granularity=minute": "usage-chart",
        f"/ui/keys/{key['id']}/usage": "usage-panel",
        "/ui/identities": ident["id"],
        f"/ui/identities/{ident['id']}": key["id"],
        "/ui/plans": plan["id"],
        f"/ui/plans/{plan['id']}": key["id"],
        "/ui/admins": root.id,
        "/ui/roles": "reader",
        "/ui/audit?actor=" + root.id: "key.create",
        "/ui/routes": "No routes",
        "/ui/upstreams": "No upstreams",
        "/ui/config": "config-version",
    }
    for path, expected in pages.items():
        r = await console.get(path)
        assert r.status_code == 200, (path, r.text[:500])
        assert expected in r.text, path
    r = await console.get("/ui/keys/key_01ARZ3NDEKTSV4RRFFQ69G5FAV")
    assert r.status_code == 404 and "NOT_FOUND" in r.text
    r = await console.get("/ui/keys/key_doesnotexist")  # malformed: the API's 400
    assert r.status_code == 400 and "VALIDATION_ERROR" in r.text
    r = await console.get("/ui/keys?status=bogus")
    assert r.status_code == 400 and "VALIDATION_ERROR" in r.text


async def test_console_false_makes_every_ui_path_404(tmp_path: trio.Path) -> None:
    raw = {
        "server": {
            "admin_listen": "127.0.0.1:0",
            "proxy_listen": "127.0.0.1:0",
            "data_dir": str(tmp_path / "data"),
            "shutdown_grace_seconds": 2,
        },
        "admin": {"console": False},
    }
    server = Server(parse_config(raw, environ={}))
    async with trio.open_nursery() as nursery:
        info = await nursery.start(server.run)
        async with httpx.AsyncClient(base_url=info.admin_url, timeout=10) as c:
            for method, path in (
                ("GET", "/ui/login"),
                ("POST", "/ui/login"),
                ("GET", "/ui/keys"),
                ("GET", "/ui/static/htmx.min.js"),
            ):
                r = await c.request(method, path)
                assert r.status_code == 404, (method, path)
                assert r.json()["code"] == "NOT_FOUND"
            assert (await c.get("/health")).status_code == 200
        server.shutdown()


async def test_over_https_the_cookie_is_secure(running: Running, root: Admin) -> None:
    # The admin app as hypercorn runs it, asked as if over TLS (a
    # TLS-terminating front): the session cookie is Secure.
    from triogate.admin.app import create_admin_app

    app = create_admin_app(running.gateway)

    async def sign_in_over(scheme: str) -> list[set[str]]:
        client = app.test_client()
        page = await client.get("/ui/login", scheme=scheme)
        login = page.headers["Set-Cookie"]
        m = _LOGIN_RE.search(await page.get_data(as_text=True))
        assert m
        r = await client.post(
            "/ui/login", form={"key": root.key, "login_csrf": m.group(1)}, scheme=scheme
        )
        assert r.status_code == 303
        session = next(v for v in r.headers.getlist("Set-Cookie") if v.startswith(f"{COOKIE}="))
        return [{a.strip().lower() for a in c.split(";")[1:]} for c in (login, session)]

    login, session = await sign_in_over("https")
    assert {"secure", "httponly", "samesite=strict", "path=/ui"} <= session
    assert {"secure", "httponly", "samesite=strict", "path=/ui/login"} <= login
    login, session = await sign_in_over("http")
    assert "secure" not in session and "secure" not in login


async def test_revoking_an_admin_from_the_console_ends_its_sessions_at_once(
    running: Running, root: Admin
) -> None:
    ops = await make_admin(running, root, "key_admin")
    async with sign_in(running, ops.key) as theirs, sign_in(running, root.key) as mine:
        assert (await theirs.get("/ui/keys")).status_code == 200
        page = (await mine.get("/ui/admins")).text
        assert f'action="/ui/admins/{ops.id}/revoke"' in page
        assert f'action="/ui/admins/{root.id}/revoke"' not in page  # never oneself
        r = await mine.post(f"/ui/admins/{ops.id}/revoke", data={"csrf": csrf_of(page)})
        assert r.status_code == 303
        assert "revoked" in (await mine.get("/ui/admins")).text
        r = await theirs.get("/ui/keys")
        assert r.status_code == 302 and r.headers["location"] == "/ui/login"
        # Revoking oneself by a forged request: the API's 409, as a message.
        page = (await mine.get("/ui/admins")).text
        r = await mine.post(f"/ui/admins/{root.id}/revoke", data={"csrf": csrf_of(page)})
        assert r.status_code == 303
        assert 'class="flash error"' in (await mine.get("/ui/admins")).text
    assert "admin.revoke" in await audit_actions(running, root)
