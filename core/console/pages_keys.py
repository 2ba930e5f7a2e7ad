"""The console's key pages: the list (search by owner and status), create,
a key's page (usage chart, limits and credits, patch), rotate, revoke,
credits. Every read and write is an admin API endpoint, through
``Console.call``."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode

from quart import Blueprint, Response, request

from triogate.console import forms
from triogate.console.web import Console, Page, redirect, when

__all__ = ["OUTCOMES", "chart_data", "key_pages"]

#: The usage history's outcomes, in the chart's order.
OUTCOMES = ("allowed", "rate_limited", "quota_exceeded", "invalid", "upstream_error")
GRANULARITIES = ("minute", "hour", "day")
STEP_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}
#: The API allows at most 2160 buckets a query; the chart draws as many.
MAX_POINTS = 2160


def chart_data(history: dict[str, Any]) -> dict[str, Any]:
    """``GET /keys/{id}/usage/history`` as the chart wants it: one x axis
    (epoch seconds) and one series per outcome. The API leaves out buckets
    without requests; the chart shows them as 0, from ``from`` to ``to``."""
    step = STEP_SECONDS.get(history.get("granularity", ""), 3600)
    counts = {
        int(datetime.fromisoformat(i["start"]).timestamp()): i for i in history.get("items", [])
    }
    xs = sorted(counts)
    if "from" in history and "to" in history:
        first = int(datetime.fromisoformat(history["from"]).timestamp()) // step * step
        end = int(datetime.fromisoformat(history["to"]).timestamp())
        if (end - first) // step <= MAX_POINTS:
            xs = sorted(set(range(first, end, step)) | set(xs))
    empty = dict.fromkeys(OUTCOMES, 0)
    return {
        "granularity": history.get("granularity"),
        "x": xs,
        # A list, not an object: the chart keeps this order (JSON objects'
        # members come out sorted).
        "series": [
            {"name": name, "values": [counts.get(x, empty)[name] for x in xs]} for name in OUTCOMES
        ],
    }


def _key_url(key_id: str) -> str:
    # The id is the URL's own segment, as sent: percent-encoded again so
    # that no byte of it (CR, LF, "/") can leave this path in a Location.
    return f"/ui/keys/{quote(key_id, safe='')}"


def key_pages(bp: Blueprint, console: Console) -> None:
    @console.page()
    async def list_keys(page: Page) -> Response:
        query = {
            k: request.args[k]
            for k in ("owner", "status", "cursor", "identity_id")
            if request.args.get(k)
        }
        result = await console.call(page, "GET", "/keys", query=query)
        filters = {k: v for k, v in query.items() if k != "cursor"}
        return console.render(
            "keys.html",
            page,
            keys=result["items"],
            next_cursor=result["next_cursor"],
            filters=filters,
            next_query=lambda cursor: "?" + urlencode({**filters, "cursor": cursor}),
        )

    @console.action(back=lambda: "/ui/keys")
    async def create_key(page: Page) -> Response:
        created = await console.call(page, "POST", "/keys", body=forms.create_key_body(page.form))
        page.session.reveal = (created["id"], created["key"])
        page.session.flash = ("ok", f"Key {created['id']} created.")
        return redirect(_key_url(created["id"]), 303)

    @console.page()
    async def show_key(page: Page, key_id: str) -> Response:
        params = {"id": key_id}
        key = await console.call(page, "GET", "/keys/{id}", params=params)
        usage = await console.call(page, "GET", "/keys/{id}/usage", params=params)
        granularity = request.args.get("granularity", "hour")
        if granularity not in GRANULARITIES:
            granularity = "hour"
        history = await console.call(
            page,
            "GET",
            "/keys/{id}/usage/history",
            params=params,
            query={"granularity": granularity},
        )
        return console.render(
            "key.html",
            page,
            key=key,
            usage=usage,
            granularity=granularity,
            granularities=GRANULARITIES,
            history=chart_data(history),
            total=sum(i["total"] for i in history["items"]),
            key_id=key_id,
            reveal=page.session.pop_reveal(key_id),
            limits_text=forms.limits_text(key["rate_limits"]),
            metadata_text=forms.metadata_text(key["metadata"]),
        )

    @console.page(touch=False)
    async def key_usage(page: Page, key_id: str) -> Response:
        """The live panel (htmx polls it): limits and credits left now."""
        usage = await console.call(page, "GET", "/keys/{id}/usage", params={"id": key_id})
        return console.render("usage_panel.html", page, usage=usage, key_id=key_id)

    @console.action(back=_key_url)
    async def rotate_key(page: Page, key_id: str) -> Response:
        result = await console.call(
            page,
            "POST",
            "/keys/{id}/rotate",
            params={"id": key_id},
            body=forms.rotate_body(page.form),
        )
        new = result["new"]
        page.session.reveal = (new["id"], new["key"])
        page.session.flash = (
            "ok",
            f"Key {key_id} rotated: it works until {when(result['old']['grace_ends_at'])}; "
            f"this is its replacement.",
        )
        return redirect(_key_url(new["id"]), 303)

    @console.action(back=_key_url)
    async def revoke_key(page: Page, key_id: str) -> Response:
        await console.call(page, "DELETE", "/keys/{id}", params={"id": key_id})
        page.session.flash = ("ok", f"Key {key_id} revoked.")
        return redirect(_key_url(key_id), 303)

    @console.action(back=_key_url)
    async def patch_key(page: Page, key_id: str) -> Response:
        body = forms.patch_key_body(page.form)
        await console.call(page, "PATCH", "/keys/{id}", params={"id": key_id}, body=body)
        page.session.flash = ("ok", "Key updated.")
        return redirect(_key_url(key_id), 303)

    @console.action(back=_key_url)
    async def key_credits(page: Page, key_id: str) -> Response:
        body = forms.credits_body(page.form)
        result = await console.call(
            page, "POST", "/keys/{id}/credits", params={"id": key_id}, body=body
        )
        page.session.flash = ("ok", f"Credits: {result['credits_remaining']} left.")
        return redirect(_key_url(key_id), 303)

    bp.add_url_rule("/keys", "keys", list_keys, methods=["GET"])
    bp.add_url_rule("/keys", "create_key", create_key, methods=["POST"])
    bp.add_url_rule("/keys/<key_id>", "key", show_key, methods=["GET"])
    bp.add_url_rule("/keys/<key_id>/usage", "key_usage", key_usage, methods=["GET"])
    bp.add_url_rule("/keys/<key_id>/rotate", "rotate_key", rotate_key, methods=["POST"])
    bp.add_url_rule("/keys/<key_id>/revoke", "revoke_key", revoke_key, methods=["POST"])
    bp.add_url_rule("/keys/<key_id>/patch", "patch_key", patch_key, methods=["POST"])
    bp.add_url_rule("/keys/<key_id>/credits", "key_credits", key_credits, methods=["POST"])
