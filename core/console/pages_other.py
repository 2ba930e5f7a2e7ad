"""The console's other pages: identities and plans with their keys, admins
and roles, the audit log, routes, upstreams and the config history. Each is
one or a few admin API endpoints, through ``Console.call``."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from quart import Blueprint, Response, request

from triogate.console import forms
from triogate.console.web import Console, Page, redirect

__all__ = ["PLAN_KEY_SCAN_PAGES", "other_pages"]

#: The keys API has no plan filter: a plan's page looks at this many pages
#: of 100 keys (newest first) and says so when it stopped before the end.
PLAN_KEY_SCAN_PAGES = 10
#: The session's one-time reveal slot holds (id, plaintext); a new admin's
#: key is shown on the admins page, whatever its id.
NEW_ADMIN = "new-admin"


def _args(*names: str) -> dict[str, str]:
    return {k: request.args[k] for k in names if request.args.get(k)}


async def _plan_keys(console: Console, page: Page, plan_id: str) -> tuple[list[Any], bool]:
    keys: list[Any] = []
    cursor: str | None = None
    for _ in range(PLAN_KEY_SCAN_PAGES):
        query = {"limit": "100", **({"cursor": cursor} if cursor else {})}
        result = await console.call(page, "GET", "/keys", query=query)
        keys += [k for k in result["items"] if k["plan_id"] == plan_id]
        cursor = result["next_cursor"]
        if cursor is None:
            return keys, False
    return keys, True


def other_pages(bp: Blueprint, console: Console) -> None:
    @console.page()
    async def identities(page: Page) -> Response:
        query = _args("external_id", "cursor")
        result = await console.call(page, "GET", "/identities", query=query)
        return console.render(
            "identities.html",
            page,
            items=result["items"],
            next_cursor=result["next_cursor"],
            external_id=query.get("external_id", ""),
        )

    @console.page()
    async def identity(page: Page, identity_id: str) -> Response:
        params = {"id": identity_id}
        found = await console.call(page, "GET", "/identities/{id}", params=params)
        usage = await console.call(page, "GET", "/identities/{id}/usage", params=params)
        keys: list[Any] = []
        if console.api.may(page.principal, "GET", "/keys"):
            result = await console.call(
                page, "GET", "/keys", query={"identity_id": identity_id, "limit": "100"}
            )
            keys = result["items"]
        return console.render("identity.html", page, identity=found, usage=usage, keys=keys)

    @console.page()
    async def plans(page: Page) -> Response:
        result = await console.call(page, "GET", "/plans", query=_args("cursor"))
        return console.render(
            "plans.html", page, items=result["items"], next_cursor=result["next_cursor"]
        )

    @console.page()
    async def plan(page: Page, plan_id: str) -> Response:
        found = await console.call(page, "GET", "/plans/{id}", params={"id": plan_id})
        keys: list[Any] = []
        partial = False
        if console.api.may(page.principal, "GET", "/keys"):
            keys, partial = await _plan_keys(console, page, plan_id)
        return console.render(
            "plan.html", page, plan=found, keys=keys, partial=partial, scanned=PLAN_KEY_SCAN_PAGES
        )

    @console.page()
    async def admins(page: Page) -> Response:
        result = await console.call(page, "GET", "/admins")
        roles: list[Any] = []
        if console.api.may(page.principal, "GET", "/roles"):
            roles = (await console.call(page, "GET", "/roles", query={"limit": "100"}))["items"]
        return console.render(
            "admins.html",
            page,
            items=result["items"],
            roles=roles,
            reveal=page.session.pop_reveal(NEW_ADMIN),
        )

    @console.action(back=lambda: "/ui/admins")
    async def create_admin(page: Page) -> Response:
        created = await console.call(page, "POST", "/admins", body=forms.admin_body(page.form))
        page.session.reveal = (NEW_ADMIN, created["key"])
        page.session.flash = ("ok", f"Admin {created['id']} ({created['role']}) created.")
        return redirect("/ui/admins", 303)

    @console.action(back=lambda admin_id: "/ui/admins")
    async def revoke_admin(page: Page, admin_id: str) -> Response:
        await console.call(page, "DELETE", "/admins/{id}", params={"id": admin_id})
        # Its sessions would end at their next request anyway; now is sooner.
        console.sessions.drop_admin(admin_id)
        page.session.flash = ("ok", f"Admin {admin_id} revoked.")
        return redirect("/ui/admins", 303)

    @console.page()
    async def roles(page: Page) -> Response:
        result = await console.call(page, "GET", "/roles", query=_args("cursor"))
        return console.render(
            "roles.html", page, items=result["items"], next_cursor=result["next_cursor"]
        )

    @console.page()
    async def audit(page: Page) -> Response:
        query = _args("actor", "action", "cursor")
        result = await console.call(page, "GET", "/audit", query=query)
        filters = {k: v for k, v in query.items() if k != "cursor"}
        return console.render(
            "audit.html",
            page,
            items=result["items"],
            filters=filters,
            next_query=(
                "?" + urlencode({**filters, "cursor": result["next_cursor"]})
                if result["next_cursor"]
                else None
            ),
        )

    @console.page()
    async def routes(page: Page) -> Response:
        result = await console.call(page, "GET", "/routes")
        return console.render("routes.html", page, items=result["items"])

    @console.page()
    async def upstreams(page: Page) -> Response:
        result = await console.call(page, "GET", "/upstreams")
        return console.render("upstreams.html", page, items=result["items"])

    @console.page()
    async def config(page: Page) -> Response:
        result = await console.call(page, "GET", "/config")
        return console.render("config.html", page, config=result)

    bp.add_url_rule("/identities", "identities", identities, methods=["GET"])
    bp.add_url_rule("/identities/<identity_id>", "identity", identity, methods=["GET"])
    bp.add_url_rule("/plans", "plans", plans, methods=["GET"])
    bp.add_url_rule("/plans/<plan_id>", "plan", plan, methods=["GET"])
    bp.add_url_rule("/admins", "admins", admins, methods=["GET"])
    bp.add_url_rule("/admins", "create_admin", create_admin, methods=["POST"])
    bp.add_url_rule("/admins/<admin_id>/revoke", "revoke_admin", revoke_admin, methods=["POST"])
    bp.add_url_rule("/roles", "roles", roles, methods=["GET"])
    bp.add_url_rule("/audit", "audit", audit, methods=["GET"])
    bp.add_url_rule("/routes", "routes", routes, methods=["GET"])
    bp.add_url_rule("/upstreams", "upstreams", upstreams, methods=["GET"])
    bp.add_url_rule("/config", "config", config, methods=["GET"])
