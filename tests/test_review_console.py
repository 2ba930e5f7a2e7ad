"""Review of the console as a hostile user would use it: login CSRF,
session fixation, forged writes by every read-only role, stored and
reflected XSS through every field an attacker controls, header injection,
path traversal, huge bodies, numbers JSON cannot carry, and the idle
timeout against the live panel's polling. Against the real server
(hypercorn admin listener, LMDB) unless a test says otherwise."""

from __future__ import annotations

import json
import re

import httpx
import pytest
import quart
import trio

from tests.conftest import Admin, Running
from tests.test_console_http import audit_actions, csrf_of, make_admin, sign_in
from triogate.admin.app import create_admin_app
from triogate.config import parse_config
from triogate.console.sessions import SessionStore
from triogate.console.web import COOKIE, LOGIN_COOKIE, Console, install_console
from triogate.runtime.server import Server

_LOGIN_TOKEN_RE = re.compile(r'name="login_csrf" value="([^"]+)"')


def login_token(html: str) -> str:
    m = _LOGIN_TOKEN_RE.search(html)
    assert m, html
    return m.group(1)


# ---- login CSRF and session fixation -----------------------------------


async def test_a_cross_site_sign_in_is_refused(running: Running, root: Admin) -> None:
    """Login CSRF: a page elsewhere posts the attacker's admin key to
    /ui/login so the victim works in the attacker's session. The sign-in
    form carries a token bound to a SameSite=Strict cookie the other site
    can neither read nor make the browser send."""
    async with httpx.AsyncClient(base_url=running.info.admin_url, timeout=10) as victim:
        # No form token, no login cookie: what a cross-site form sends.
        r = await victim.post("/ui/login", data={"key": root.key})
        assert r.status_code == 403, r.text
        assert COOKIE not in victim.cookies and "expired" in r.text
        # The attacker's own token (from its own GET) without its cookie.
        async with httpx.AsyncClient(base_url=running.info.admin_url) as attacker:
            token = login_token((await attacker.get("/ui/login")).text)
        r = await victim.post("/ui/login", data={"key": root.key, "login_csrf": token})
        assert r.status_code == 403
        assert COOKIE not in victim.cookies
        # The form as the browser really sends it works.
        page = await victim.get("/ui/login")
        cookie = page.headers["set-cookie"]
        attrs = {a.strip().lower() for a in cookie.split(";")[1:]}
        assert cookie.startswith(f"{LOGIN_COOKIE}=")
        assert {"httponly", "samesite=strict"} <= attrs
        r = await victim.post(
            "/ui/login", data={"key": root.key, "login_csrf": login_token(page.text)}
        )
        assert r.status_code == 303 and r.headers["location"] == "/ui/"
        assert (await victim.get("/ui/keys")).status_code == 200


async def test_a_write_another_site_started_is_refused(
    console_root: httpx.AsyncClient, running: Running, root: Admin
) -> None:
    """A sibling subdomain can plant cookies (same-site, not same-origin);
    the browser's Sec-Fetch-Site header tells, and such writes are refused
    even with a valid token."""
    token = csrf_of((await console_root.get("/ui/keys")).text)
    for site in ("cross-site", "same-site"):
        r = await console_root.post(
            "/ui/keys",
            data={"csrf": token, "name": "n", "owner": "o"},
            headers={"Sec-Fetch-Site": site},
        )
        assert r.status_code == 403 and site in r.json()["detail"], r.text
        r = await console_root.post(
            "/ui/logout", data={"csrf": token}, headers={"Sec-Fetch-Site": site}
        )
        assert r.status_code == 403
    assert "key.create" not in await audit_actions(running, root)
    for site in ("same-origin", "none"):  # this origin's own page; typed by the user
        r = await console_root.post(
            "/ui/keys",
            data={"csrf": token, "name": "n", "owner": "o"},
            headers={"Sec-Fetch-Site": site},
        )
        assert r.status_code == 303, (site, r.text)
    async with httpx.AsyncClient(base_url=running.info.admin_url, timeout=10) as c:
        page = await c.get("/ui/login")
        r = await c.post(
            "/ui/login",
            data={"key": root.key, "login_csrf": login_token(page.text)},
            headers={"Sec-Fetch-Site": "same-site"},
        )
        assert r.status_code == 403 and COOKIE not in c.cookies


async def test_signing_in_never_keeps_a_session_id_set_before(
    running: Running, root: Admin
) -> None:
    """Session fixation: an id the browser had before signing in (planted,
    or the attacker's own live session) is never the signed-in one."""
    viewer = await make_admin(running, root, "key_viewer")
    async with sign_in(running, viewer.key) as attacker:
        planted = attacker.cookies[COOKIE]
    async with httpx.AsyncClient(
        base_url=running.info.admin_url, cookies={COOKIE: planted}, timeout=10
    ) as victim:
        page = await victim.get("/ui/login")
        r = await victim.post(
            "/ui/login", data={"key": root.key, "login_csrf": login_token(page.text)}
        )
        assert r.status_code == 303
        (fresh,) = (
            v.split(";")[0].split("=", 1)[1]
            for v in r.headers.get_list("set-cookie")
            if v.startswith(f"{COOKIE}=")
        )
        assert fresh != planted and len(fresh) >= 43  # 256 random bits
    # The planted id is dead, not upgraded to the root admin.
    async with httpx.AsyncClient(
        base_url=running.info.admin_url, cookies={COOKIE: planted}
    ) as attacker:
        r = await attacker.get("/ui/admins")
        assert r.status_code == 302 and r.headers["location"] == "/ui/login"


# ---- every write route, forged by every role that may not write ------------


def _console_writes() -> list[str]:
    """Every POST route of the console except signing in and out."""
    app = quart.Quart("rules")
    install_console(app, object())  # type: ignore[arg-type]  # only its routes are read
    return sorted(
        rule.rule
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/ui/")
        and "POST" in (rule.methods or ())
        and rule.rule not in ("/ui/login", "/ui/logout")
    )


@pytest.mark.parametrize("role", ["key_viewer", "auditor", "key_admin"])
async def test_every_console_write_is_refused_as_the_api_refuses_it(
    running: Running, root: Admin, role: str
) -> None:
    h = root.headers
    c = running.client
    key_id = (await c.post("/keys", json={"name": "k", "owner": "o"}, headers=h)).json()["id"]
    other = await make_admin(running, root, "auditor")
    admin = await make_admin(running, root, role)
    before = await audit_actions(running, root)
    writes = _console_writes()
    assert "/ui/admins" in writes and "/ui/keys/<key_id>/revoke" in writes
    async with sign_in(running, admin.key) as s:
        # The sign-out form's token is on every page, a refused one too.
        token = csrf_of((await s.get("/ui/keys")).text)
        for rule in writes:
            path = rule.replace("<key_id>", key_id).replace("<admin_id>", other.id)
            data = {
                "csrf": token,
                "name": "x",
                "owner": "y",
                "email": "x@example.com",
                "role": "super_admin",
                "op": "set",
                "amount": "1",
            }
            r = await s.post(path, data=data)
            # The API's own answer for this admin and this endpoint.
            api_rule = rule.replace("/ui", "", 1)
            if role == "key_admin" and not api_rule.startswith("/admins"):
                continue  # a key_admin may write keys; its refusals are the admin routes
            assert r.status_code == 403, (role, path, r.text)
            assert r.json()["code"] == "FORBIDDEN"
    after = await audit_actions(running, root)
    if role != "key_admin":
        assert after == before
    for action in ("admin.create", "admin.revoke"):
        assert after.count(action) == before.count(action), action
    r = await c.get("/admins", headers=h)
    assert all(a["status"] == "active" for a in r.json()["items"])


async def test_get_never_changes_state(console_root: httpx.AsyncClient, running: Running) -> None:
    key_id = await _new_key(running, console_root)
    for path in ("/ui/logout", f"/ui/keys/{key_id}/revoke", f"/ui/keys/{key_id}/rotate"):
        r = await console_root.get(path)
        assert r.status_code == 405, (path, r.status_code)
    assert (await console_root.get("/ui/keys")).status_code == 200  # still signed in
    page = (await console_root.get(f"/ui/keys/{key_id}")).text
    assert 'id="revoke"' in page  # still active


# ---- the admin console can create an admin, as POST /admins does --------------


async def test_a_super_admin_creates_an_admin_with_a_role_and_reads_its_key_once(
    console_root: httpx.AsyncClient, running: Running, root: Admin
) -> None:
    page = (await console_root.get("/ui/admins")).text
    assert 'id="create-admin"' in page
    for role in ("super_admin", "key_admin", "key_viewer", "auditor"):
        assert f'<option value="{role}"' in page
    r = await console_root.post(
        "/ui/admins",
        data={
            "csrf": csrf_of(page),
            "name": "ops",
            "email": "ops@example.com",
            "role": "auditor",
        },
    )
    assert r.status_code == 303 and r.headers["location"] == "/ui/admins"
    r = await console_root.get("/ui/admins")
    assert r.headers["cache-control"] == "no-store"  # no copy of the key anywhere
    page = r.text
    m = re.search(r'<code id="new-admin-key">([^<]+)</code>', page)
    assert m, page
    # It is the new admin's real key, and it is an auditor.
    async with sign_in(running, m.group(1)) as ops:
        assert (await ops.get("/ui/")).headers["location"] == "/ui/audit"
    again = (await console_root.get("/ui/admins")).text
    assert m.group(1) not in again and 'id="new-admin-key"' not in again
    assert "admin.create" in await audit_actions(running, root)
    # A refused field comes back as a message, no admin made.
    r = await console_root.post(
        "/ui/admins",
        data={"csrf": csrf_of(page), "name": "x", "email": "not-an-email", "role": "auditor"},
    )
    assert r.status_code == 303
    page = (await console_root.get("/ui/admins")).text
    assert 'class="flash error"' in page and "email" in page
    # A key_admin sees no such form.
    ka = await make_admin(running, root, "key_admin")
    async with sign_in(running, ka.key) as s:
        r = await s.get("/ui/admins")
        assert r.status_code == 403 and 'id="create-admin"' not in r.text


async def test_metadata_is_shown_and_edited_as_json(
    console_root: httpx.AsyncClient, running: Running, root: Admin
) -> None:
    token = csrf_of((await console_root.get("/ui/keys")).text)
    r = await console_root.post(
        "/ui/keys",
        data={"csrf": token, "name": "k", "owner": "o", "metadata": '{"tier": "gold"}'},
    )
    assert r.status_code == 303, r.text
    url = r.headers["location"]
    key_id = url.rsplit("/", 1)[1]
    api = (await running.client.get(f"/keys/{key_id}", headers=root.headers)).json()
    assert api["metadata"] == {"tier": "gold"}
    page = (await console_root.get(url)).text
    assert 'id="key-metadata"' in page and "&#34;tier&#34;: &#34;gold&#34;" in page
    form = {"csrf": token, "name": "k", "enabled": "on"}
    for bad in ('{"a": NaN}', "[1]", '{"a": ', '{"a": Infinity}', "[" * 5000 + "]" * 5000):
        r = await console_root.post(f"{url}/patch", data={**form, "metadata": bad})
        assert r.status_code == 303 and r.headers["location"] == url
        flash = (await console_root.get(url)).text
        assert 'class="flash error"' in flash and "metadata" in flash, bad
    api = (await running.client.get(f"/keys/{key_id}", headers=root.headers)).json()
    assert api["metadata"] == {"tier": "gold"}
    r = await console_root.post(f"{url}/patch", data={**form, "metadata": '{"tier": "pro"}'})
    assert r.status_code == 303
    api = (await running.client.get(f"/keys/{key_id}", headers=root.headers)).json()
    assert api["metadata"] == {"tier": "pro"}
    r = await console_root.post(f"{url}/patch", data={**form, "metadata": " "})
    api = (await running.client.get(f"/keys/{key_id}", headers=root.headers)).json()
    assert api["metadata"] is None


# ---- XSS ------------------------------------------------------------------------

PAYLOADS = (
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(2)>',
    "'><svg onload=alert(3)>",
    "</code></script><script>alert(4)</script>",
)
RAW_MARKERS = ("<script>alert", "<img src=x", "<svg onload", "<script>alert(4)")


async def test_attacker_controlled_fields_are_escaped_on_every_page(
    console_root: httpx.AsyncClient, running: Running, root: Admin
) -> None:
    h = root.headers
    c = running.client
    evil = " ".join(PAYLOADS)
    plan = (await c.post("/plans", json={"name": evil[:255]}, headers=h)).json()
    assert "id" in plan, plan
    ident = (
        await c.post("/identities", json={"external_id": evil[:256], "name": evil[:255]}, headers=h)
    ).json()
    assert "id" in ident, ident
    key = (
        await c.post(
            "/keys",
            json={
                "name": evil[:255],
                "owner": evil[:255],
                "metadata": {"note": evil, evil[:60]: [evil]},
                "plan_id": plan["id"],
                "identity_id": ident["id"],
            },
            headers=h,
        )
    ).json()
    assert "id" in key, key
    r = await c.post(
        "/admins",
        json={"name": evil[:255], "email": "a\"'<b>@x.example", "role": "auditor"},
        headers=h,
    )
    assert r.status_code == 201, r.text
    r = await c.post(
        "/roles", json={"name": "reader", "scopes": ["a:read"], "description": evil}, headers=h
    )
    assert r.status_code == 201, r.text
    pages = [
        "/ui/keys",
        f"/ui/keys/{key['id']}",
        f"/ui/keys/{key['id']}/usage",
        "/ui/identities",
        f"/ui/identities/{ident['id']}",
        "/ui/plans",
        f"/ui/plans/{plan['id']}",
        "/ui/admins",
        "/ui/roles",
        "/ui/audit",
        # Reflected: search parameters and problem details echoed back.
        "/ui/keys?owner=" + httpx.QueryParams({"x": evil})["x"],
        "/ui/audit?actor=" + PAYLOADS[1] + "&action=" + PAYLOADS[0],
        "/ui/identities?external_id=" + PAYLOADS[2],
        "/ui/keys?status=" + PAYLOADS[0],
        "/ui/keys?cursor=" + PAYLOADS[1],
        "/ui/keys/" + PAYLOADS[2].replace("/", "%2F"),
    ]
    for path in pages:
        r = await console_root.get(path, params=None)
        assert r.status_code < 500, (path, r.text[:300])
        for marker in RAW_MARKERS:
            assert marker not in r.text, (path, marker)
    page = (await console_root.get(f"/ui/keys/{key['id']}")).text
    assert 'id="key-metadata"' in page and "&lt;script&gt;alert(1)" in page
    # A refused write's message (the API's detail, echoing the field) too.
    r = await console_root.post(
        "/ui/keys",
        data={"csrf": csrf_of(page), "name": "x", "owner": "y", "rate_limits": PAYLOADS[0]},
    )
    assert r.status_code == 303
    page = (await console_root.get("/ui/keys")).text
    assert 'class="flash error"' in page
    for marker in RAW_MARKERS:
        assert marker not in page


async def test_route_and_upstream_names_from_config_are_escaped(tmp_path: trio.Path) -> None:
    evil = '<script>alert("r")</script>'
    raw = {
        "server": {
            "admin_listen": "127.0.0.1:0",
            "proxy_listen": "127.0.0.1:0",
            "data_dir": str(tmp_path / "data"),
            "shutdown_grace_seconds": 2,
        },
        "upstreams": {"svc": {"targets": ["127.0.0.1:9"]}},
        "routes": [{"name": evil, "path": "/<x>", "upstream": "svc"}],
    }
    try:
        config = parse_config(raw, environ={})
    except Exception as error:  # the config itself refuses markup: safe too
        assert "name" in str(error)
        return
    server = Server(config)
    async with trio.open_nursery() as nursery:
        info = await nursery.start(server.run)
        async with httpx.AsyncClient(base_url=info.admin_url, timeout=10) as c:
            r = await c.post("/setup", json={"name": "r", "email": "r@example.com"})
            key = r.json()["key"]
            page = await c.get("/ui/login")
            await c.post("/ui/login", data={"key": key, "login_csrf": login_token(page.text)})
            r = await c.get("/ui/routes")
            assert r.status_code == 200
            assert "<script>alert" not in r.text and "&lt;script&gt;" in r.text
        server.shutdown()


# ---- header injection, traversal, huge bodies, numbers -------------------------


async def test_a_crafted_key_id_never_reaches_a_header_or_a_500(
    console_root: httpx.AsyncClient,
) -> None:
    token = csrf_of((await console_root.get("/ui/keys")).text)
    for raw in ("%0D%0ASet-Cookie:%20x=1", "%0d%0a", "%00", "..%2F..%2Fadmins", "%E2%80%A8"):
        for action in ("revoke", "rotate", "patch", "credits"):
            r = await console_root.post(
                f"/ui/keys/{raw}/{action}",
                data={"csrf": token, "name": "n", "op": "set", "amount": "1"},
            )
            assert r.status_code < 500, (raw, action, r.text[:300])
            assert "x=1" not in r.headers.get("set-cookie", "")
            location = r.headers.get("location", "")
            assert "\r" not in location and "\n" not in location
            if location:
                assert location.startswith("/ui/"), location
        r = await console_root.get(f"/ui/keys/{raw}")
        assert r.status_code in (400, 404), (raw, r.status_code)


async def test_static_files_cannot_escape_their_folder(console_root: httpx.AsyncClient) -> None:
    for path in (
        "/ui/static/../web.py",
        "/ui/static/%2e%2e/web.py",
        "/ui/static/..%2fweb.py",
        "/ui/static/..%5cweb.py",
        "/ui/static/%2e%2e%2f%2e%2e%2fconfig.py",
        "/ui/static//etc/passwd",  # werkzeug's 308 to /ui/static/etc/passwd first
        "/ui/static/templates/../../sessions.py",
    ):
        r = await console_root.get(path, follow_redirects=True)
        assert r.status_code == 404, (path, r.status_code)
        assert "import" not in r.text and "root:" not in r.text


async def test_huge_or_many_part_form_bodies_are_refused_not_held(
    console_root: httpx.AsyncClient, running: Running
) -> None:
    token = csrf_of((await console_root.get("/ui/keys")).text)
    big = "a" * (2 << 20)
    r = await console_root.post("/ui/keys", data={"csrf": token, "name": big, "owner": "o"})
    assert r.status_code == 413, r.text[:200]
    r = await running.client.post("/ui/login", data={"key": big})
    assert r.status_code == 413
    many = {f"f{i}": "x" for i in range(5000)}
    # Many small fields under the body cap: bounded by it; never a 500.
    r = await console_root.post("/ui/keys", data={"csrf": token, **many})
    assert r.status_code < 500, r.status_code
    assert (await console_root.get("/ui/keys")).status_code == 200


@pytest.mark.parametrize(
    "fields",
    [
        {"rate_limits": "m 10 nan"},
        {"rate_limits": "m 10 inf"},
        {"rate_limits": "m 10 1e400"},
        {
            "credits_remaining": "5",
            "credits_refill_amount": "5",
            "credits_refill_interval_seconds": "nan",
        },
        {
            "credits_remaining": "5",
            "credits_refill_amount": "5",
            "credits_refill_interval_seconds": "inf",
        },
        {"credits_remaining": "9" * 5000},
    ],
)
async def test_numbers_json_cannot_carry_are_refused(
    console_root: httpx.AsyncClient, running: Running, root: Admin, fields: dict[str, str]
) -> None:
    """NaN and infinity cannot be written in JSON, so the API never sees
    them; an HTML form can send them: the console must refuse them."""
    token = csrf_of((await console_root.get("/ui/keys")).text)
    r = await console_root.post(
        "/ui/keys", data={"csrf": token, "name": "n", "owner": "o", **fields}
    )
    assert r.status_code == 303 and r.headers["location"] == "/ui/keys", r.text[:300]
    assert 'class="flash error"' in (await console_root.get("/ui/keys")).text
    assert "key.create" not in await audit_actions(running, root)


async def test_a_poll_after_the_session_ended_loads_the_sign_in_page_whole(
    running: Running, root: Admin
) -> None:
    async with sign_in(running, root.key) as c:
        key_id = await _new_key(running, c)
        token = csrf_of((await c.get("/ui/keys")).text)
        assert (await c.post("/ui/logout", data={"csrf": token})).status_code == 303
        r = await c.get(f"/ui/keys/{key_id}/usage", headers={"HX-Request": "true"})
        assert r.status_code == 200 and r.headers["hx-redirect"] == "/ui/login"
        assert "admin-key" not in r.text  # no sign-in form swapped into the panel
        r = await c.get(f"/ui/keys/{key_id}/usage")  # a plain browser request
        assert r.status_code == 302 and r.headers["location"] == "/ui/login"


async def test_a_wrong_key_is_never_echoed(running: Running) -> None:
    async with httpx.AsyncClient(base_url=running.info.admin_url, timeout=10) as c:
        for key in ("tgadm_" + "S3CRETZ" * 6, "S3CRETZ-not-a-key", "<b>S3CRETZ</b>"):
            page = await c.get("/ui/login")
            r = await c.post("/ui/login", data={"key": key, "login_csrf": login_token(page.text)})
            assert r.status_code == 401
            assert "S3CRETZ" not in r.text and "S3CRETZ" not in str(r.headers)


# ---- sessions: polling, per-admin bound, htmx history ----------------------------


async def test_the_live_panels_polling_does_not_keep_a_session_alive(
    running: Running, root: Admin
) -> None:
    app = create_admin_app(running.gateway)
    console = app.extensions["triogate.console"]
    assert isinstance(console, Console)
    client = app.test_client()
    page = await client.get("/ui/login")
    token = login_token(await page.get_data(as_text=True))
    r = await client.post("/ui/login", form={"key": root.key, "login_csrf": token})
    assert r.status_code == 303
    key_id = (
        await running.client.post("/keys", json={"name": "k", "owner": "o"}, headers=root.headers)
    ).json()["id"]
    (session,) = list(console.sessions._sessions.values())
    session.last_seen -= 100.0
    seen = session.last_seen
    r = await client.get(f"/ui/keys/{key_id}/usage", headers={"HX-Request": "true"})
    assert r.status_code == 200
    assert session.last_seen == seen  # a poll is not the admin at work
    r = await client.get("/ui/keys")
    assert r.status_code == 200 and session.last_seen > seen


def test_one_admin_cannot_push_every_other_session_out() -> None:
    now = [0.0]
    store = SessionStore(lambda: now[0], lambda: 3600.0, max_sessions=10, max_per_admin=3)
    theirs = store.create("k1", "adm_victim")
    mine = [store.create("k2", "adm_flood") for _ in range(50)]
    assert store.get(theirs.id) is theirs
    assert len(store) == 4
    # The flooding admin keeps its newest sessions only.
    assert [store.get(s.id) is not None for s in mine[-4:]] == [False, True, True, True]


async def test_htmx_keeps_no_copy_of_pages_in_browser_storage(
    console_root: httpx.AsyncClient,
) -> None:
    """htmx's history cache keeps snapshots of pages (keys, the CSRF token)
    in sessionStorage, where Back after sign-out would show them; no-store
    means no copy, so the console turns that cache off."""
    page = (await console_root.get("/ui/keys")).text
    m = re.search(r"<meta name=\"htmx-config\" content='([^']+)'>", page)
    assert m, page[:500]
    config = json.loads(m.group(1))
    assert config["historyCacheSize"] == 0 and config["refreshOnHistoryMiss"] is True
    assert config["allowEval"] is False and config["allowScriptTags"] is False


# ---- fixtures -------------------------------------------------------------------


@pytest.fixture
async def console_root(running: Running, root: Admin) -> object:
    async with sign_in(running, root.key) as client:
        yield client


async def _new_key(running: Running, console: httpx.AsyncClient) -> str:
    token = csrf_of((await console.get("/ui/keys")).text)
    r = await console.post("/ui/keys", data={"csrf": token, "name": "k", "owner": "o"})
    assert r.status_code == 303, r.text
    return str(r.headers["location"].rsplit("/", 1)[1])


def test_metadata_field_parses_as_the_api_parses_a_body() -> None:
    from triogate.console import forms
    from triogate.errors import ValidationError

    assert forms.metadata("  ") is None
    assert forms.metadata('{"a": [1, 2]}') == {"a": [1, 2]}
    assert forms.metadata_text({"b": 1, "a": "<x>"}) == '{\n  "a": "<x>",\n  "b": 1\n}'
    assert forms.metadata_text(None) == ""
    for bad in ("[1]", "NaN", '{"a": NaN}', '{"a": Infinity}', "{", "[" * 3000 + "]" * 3000):
        with pytest.raises(ValidationError) as caught:
            forms.metadata(bad)
        assert caught.value.errors[0].path == "metadata", bad
