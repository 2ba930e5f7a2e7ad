"""HTML form fields to admin API request bodies, sans-IO.

A form sends strings; the API's request types want numbers, lists and
objects. These functions only reshape: every rule (lengths, ranges, unique
names) is the API's own, checked when the body goes through the endpoint's
type. A field that cannot even be reshaped (``abc`` as a number) is a
ValidationError naming the field, as the API would name it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from triogate.errors import ValidationError
from triogate.validation import decode_json_object

__all__ = [
    "admin_body",
    "create_key_body",
    "credits_body",
    "metadata",
    "metadata_text",
    "patch_key_body",
    "rate_limits",
    "rotate_body",
    "scopes",
]

_SPLIT = re.compile(r"[\s,]+")


def _text(form: Mapping[str, str], name: str) -> str:
    return form.get(name, "").strip()


def _int(value: str, path: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValidationError.single(path, f"{value!r} is not a whole number") from None


def _float(value: str, path: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValidationError.single(path, f"{value!r} is not a number") from None


def scopes(value: str) -> list[str]:
    """``orders:read, users:*`` (commas or spaces) to a list."""
    return [s for s in _SPLIT.split(value.strip()) if s]


def rate_limits(value: str) -> list[dict[str, Any]]:
    """One limit a line: ``NAME LIMIT PERIOD_SECONDS [ALGORITHM]``."""
    limits: list[dict[str, Any]] = []
    for i, line in enumerate(s for s in value.splitlines() if s.strip()):
        parts = line.split()
        path = f"rate_limits[{i}]"
        if len(parts) not in (3, 4):
            raise ValidationError.single(
                path, "write a limit as: NAME LIMIT PERIOD_SECONDS [gcra|sliding_window]"
            )
        limit: dict[str, Any] = {
            "name": parts[0],
            "limit": _int(parts[1], f"{path}.limit"),
            "period_seconds": _float(parts[2], f"{path}.period_seconds"),
        }
        if len(parts) == 4:
            limit["algorithm"] = parts[3]
        limits.append(limit)
    return limits


def metadata(value: str) -> dict[str, Any] | None:
    """A JSON object, or None when empty. Decoded as the API decodes a
    body (msgspec: no NaN or Infinity, a bounded depth)."""
    if not value.strip():
        return None
    try:
        return decode_json_object(value.encode())
    except ValidationError as error:
        raise ValidationError.single("metadata", error.errors[0].message) from None


def metadata_text(value: dict[str, Any] | None) -> str:
    """The reverse of ``metadata``: what the patch form shows."""
    return json.dumps(value, indent=2, sort_keys=True) if value else ""


def _credits(form: Mapping[str, str]) -> dict[str, Any] | None:
    remaining = _text(form, "credits_remaining")
    if not remaining:
        return None
    credits: dict[str, Any] = {"remaining": _int(remaining, "credits.remaining")}
    amount = _text(form, "credits_refill_amount")
    if amount:
        credits["refill_amount"] = _int(amount, "credits.refill_amount")
    interval = _text(form, "credits_refill_interval_seconds")
    if interval:
        credits["refill_interval_seconds"] = _float(interval, "credits.refill_interval_seconds")
    return credits


def create_key_body(form: Mapping[str, str]) -> dict[str, Any]:
    """``POST /keys`` from the create form (empty optional fields left out)."""
    body: dict[str, Any] = {"name": _text(form, "name"), "owner": _text(form, "owner")}
    if _text(form, "scopes"):
        body["scopes"] = scopes(form["scopes"])
    if _text(form, "rate_limits"):
        body["rate_limits"] = rate_limits(form["rate_limits"])
    credits = _credits(form)
    if credits is not None:
        body["credits"] = credits
    for name in ("expires_at", "identity_id", "plan_id"):
        if _text(form, name):
            body[name] = _text(form, name)
    if _text(form, "roles"):
        body["roles"] = scopes(form["roles"])
    meta = metadata(form.get("metadata", ""))
    if meta is not None:
        body["metadata"] = meta
    return body


def patch_key_body(form: Mapping[str, str]) -> dict[str, Any]:
    """``PATCH /keys/{id}`` from the key page's form: the fields it shows.
    An empty expiry (or metadata) clears it; ``enabled`` is a checkbox
    (absent: off)."""
    return {
        "name": _text(form, "name"),
        "metadata": metadata(form.get("metadata", "")),
        "scopes": scopes(form.get("scopes", "")),
        "rate_limits": rate_limits(form.get("rate_limits", "")),
        "expires_at": _text(form, "expires_at") or None,
        "enabled": form.get("enabled") == "on",
    }


def admin_body(form: Mapping[str, str]) -> dict[str, Any]:
    """``POST /admins`` from the create form: a role from the picker."""
    return {"name": _text(form, "name"), "email": _text(form, "email"), "role": _text(form, "role")}


def rotate_body(form: Mapping[str, str]) -> dict[str, Any]:
    grace = _text(form, "grace_seconds")
    return {"grace_seconds": _int(grace, "grace_seconds")} if grace else {}


def credits_body(form: Mapping[str, str]) -> dict[str, Any]:
    """``POST /keys/{id}/credits``: ``op`` and ``amount``."""
    return {"op": _text(form, "op"), "amount": _int(_text(form, "amount"), "amount")}


def limits_text(limits: list[dict[str, Any]]) -> str:
    """The reverse of ``rate_limits``: what the patch form shows."""
    return "\n".join(
        f"{lim['name']} {lim['limit']} {lim['period_seconds']:g} {lim['algorithm']}"
        for lim in limits
    )
