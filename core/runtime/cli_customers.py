"""``triogate identities create|list|get|patch|delete|usage``, ``triogate plans
create|list|get|patch|delete``, ``triogate keys patch`` and the customer
options of ``keys create`` (``--identity``, ``--plan``, ``--role``,
``--disable``): the admin API's identities, plans and key fields on the data
directory, as ``triogate keys`` is for keys.

``cli`` registers these and lends its helpers (options, opening the
services, printing, the rate-limit parser), so this module does not import
it back."""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from typing import Any

from triogate.control.audit import Actor
from triogate.control.customer_models import (
    CreateIdentityRequest,
    CreatePlanRequest,
    UpdateIdentityRequest,
    UpdatePlanRequest,
)
from triogate.control.models import UpdateKeyRequest
from triogate.errors import FieldError, ValidationError
from triogate.runtime.gateway import Services
from triogate.validation import convert_all

__all__ = ["add_customer_commands", "add_key_customer_options", "key_customer_fields"]

WithServices = Callable[[argparse.Namespace, Callable[[Services], Awaitable[Any]]], Any]
Printer = Callable[[argparse.Namespace, Any, Callable[[Any], str]], None]
DataOptions = Callable[[argparse.ArgumentParser], None]
CLI_ACTOR = Actor("cli", None)


# ---- keys: the customer fields ----------------------------------------------------


def add_key_customer_options(p: argparse.ArgumentParser, *, patch: bool = False) -> None:
    """``--identity``, ``--plan``, ``--role`` and ``--disable`` (with
    ``patch``: also ``--enable`` and the ``--no-…`` options that clear)."""
    p.add_argument("--identity", metavar="IDN_ID", help="the identity whose pool the key shares")
    p.add_argument("--plan", metavar="PLN_ID", help="the plan whose settings apply")
    p.add_argument("--role", action="append", metavar="NAME", help="a role name, repeatable")
    if patch:
        state = p.add_mutually_exclusive_group()
        state.add_argument("--disable", action="store_true", help="suspend (403 KEY_DISABLED)")
        state.add_argument("--enable", action="store_true", help="restore a disabled key")
        p.add_argument("--no-identity", action="store_true", help="take the key off its identity")
        p.add_argument("--no-plan", action="store_true", help="take the key off its plan")
        p.add_argument("--no-roles", action="store_true", help="remove every role")
    else:
        p.add_argument("--disable", action="store_true", help="create the key disabled")


def key_customer_fields(args: argparse.Namespace, *, patch: bool = False) -> dict[str, Any]:
    """The request fields the options of ``add_key_customer_options`` say."""
    raw: dict[str, Any] = {}
    if args.identity is not None:
        raw["identity_id"] = args.identity
    if args.plan is not None:
        raw["plan_id"] = args.plan
    if args.role:
        raw["roles"] = args.role
    if args.disable:
        raw["enabled"] = False
    if patch:
        if args.enable:
            raw["enabled"] = True
        if args.no_identity:
            raw["identity_id"] = None
        if args.no_plan:
            raw["plan_id"] = None
        if args.no_roles:
            raw["roles"] = []
    return raw


def _metadata(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValidationError([FieldError("metadata", f"invalid JSON: {exc}")]) from None


# ---- printing ---------------------------------------------------------------------


def _identity_line(i: Any) -> str:
    state = "enabled" if i.enabled else "disabled"
    limits = ",".join(f"{r.name}={r.limit}/{r.period_seconds:g}" for r in i.rate_limits) or "-"
    credits = "-" if i.credits is None else str(i.credits.remaining)
    return (
        f"{i.id}  {state:<8} external_id={i.external_id!r} name={i.name!r} "
        f"plan={i.plan_id or '-'} limits={limits} credits={credits}"
    )


def _plan_line(p: Any) -> str:
    limits = ",".join(f"{r.name}={r.limit}/{r.period_seconds:g}" for r in p.rate_limits) or "-"
    credits = "-" if p.credits is None else str(p.credits.remaining)
    scopes = ",".join(p.scopes) or "-"
    return f"{p.id}  v{p.version} {p.name!r} scopes={scopes} limits={limits} credits={credits}"


def _usage_lines(u: Any) -> str:
    classes = " ".join(f"{k}={v}" for k, v in u.by_status_class.items())
    last = u.last_used_at.isoformat() if u.last_used_at else "never"
    credits = "-" if u.credits_remaining is None else str(u.credits_remaining)
    return (
        f"{u.identity_id}  keys={u.keys} requests={u.requests} last_used={last}\n"
        f"{classes}\ncredits_remaining={credits}"
    )


def _pages(line: Callable[[Any], str], empty: str) -> Callable[[Any], str]:
    def human(p: Any) -> str:
        lines = [line(item) for item in p.items]
        if p.next_cursor:
            lines.append(f"next cursor: {p.next_cursor}")
        return "\n".join(lines) or empty

    return human


# ---- the commands -----------------------------------------------------------------


def add_customer_commands(
    sub: Any,
    keys: Any,
    data_options: DataOptions,
    with_services: WithServices,
    show: Printer,
    rate_limit: Callable[[str], dict[str, Any]],
    key_line: Callable[[Any], str],
) -> None:
    """Add ``identities ...``, ``plans ...`` to the subcommands ``sub`` and
    ``patch`` to the ``keys`` subcommands."""

    def limits_and_credits(args: argparse.Namespace, raw: dict[str, Any]) -> None:
        if args.rate_limit:
            raw["rate_limits"] = args.rate_limit
        if getattr(args, "clear_rate_limits", False):
            raw["rate_limits"] = []
        if args.credits is not None:
            raw["credits"] = {"remaining": args.credits}
        if getattr(args, "clear_credits", False):
            raw["credits"] = None

    def limit_options(p: argparse.ArgumentParser, *, patch: bool) -> None:
        p.add_argument(
            "--rate-limit", action="append", type=rate_limit, help="name=limit/seconds, repeatable"
        )
        p.add_argument("--credits", type=int, help="credits remaining")
        if patch:
            p.add_argument("--clear-rate-limits", action="store_true", help="remove every limit")
            p.add_argument("--clear-credits", action="store_true", help="remove the credits")

    def one(
        command: str,
        helptext: str,
        run: Callable[[Services, argparse.Namespace], Awaitable[Any] | Any],
        line: Callable[[Any], str],
        group: Any,
    ) -> argparse.ArgumentParser:
        def func(args: argparse.Namespace) -> int:
            async def call(gw: Services) -> Any:
                result = run(gw, args)
                return await result if isinstance(result, Awaitable) else result

            show(args, with_services(args, call), line)
            return 0

        p: argparse.ArgumentParser = group.add_parser(command, help=helptext)
        data_options(p)
        p.add_argument("id", help="its id")
        p.set_defaults(func=func)
        return p

    # -- keys patch ----------------------------------------------------------------

    def keys_patch(args: argparse.Namespace) -> int:
        raw = key_customer_fields(args, patch=True)
        if args.name is not None:
            raw["name"] = args.name
        if args.scope:
            raw["scopes"] = args.scope
        if args.expires_at is not None:
            raw["expires_at"] = args.expires_at
        limits_and_credits(args, raw)
        if not raw:
            raise ValidationError([FieldError("$", "nothing to change: give an option")])
        req = convert_all(raw, UpdateKeyRequest, strict=False)
        show(
            args, with_services(args, lambda gw: gw.keys.update(args.id, req, CLI_ACTOR)), key_line
        )
        return 0

    p = keys.add_parser("patch", help="change a key: name, scopes, limits, identity, plan, roles")
    data_options(p)
    p.add_argument("id", metavar="KEY_ID", help="the key's id (key_…)")
    p.add_argument("--name", help="a new label")
    p.add_argument("--scope", action="append", help="the new scopes, repeatable")
    p.add_argument("--expires-at", help="RFC 3339")
    limit_options(p, patch=True)
    add_key_customer_options(p, patch=True)
    p.set_defaults(func=keys_patch)

    # -- identities ----------------------------------------------------------------

    ids = sub.add_parser("identities", help="manage identities (customers)").add_subparsers(
        dest="identities_command", required=True
    )

    def identity_create(args: argparse.Namespace) -> int:
        raw: dict[str, Any] = {"external_id": args.external_id}
        if args.name is not None:
            raw["name"] = args.name
        if args.metadata is not None:
            raw["metadata"] = _metadata(args.metadata)
        if args.plan is not None:
            raw["plan_id"] = args.plan
        if args.disable:
            raw["enabled"] = False
        limits_and_credits(args, raw)
        req = convert_all(raw, CreateIdentityRequest, strict=False)
        created = with_services(args, lambda gw: gw.identities.create(req, CLI_ACTOR))
        show(args, created, _identity_line)
        return 0

    p = ids.add_parser("create", help="create an identity")
    data_options(p)
    p.add_argument("--external-id", required=True, help="your id for the customer; unique")
    p.add_argument("--name", help="a name for people")
    p.add_argument("--metadata", help="a JSON object")
    p.add_argument("--plan", metavar="PLN_ID", help="the plan whose settings apply")
    p.add_argument("--disable", action="store_true", help="create it disabled")
    limit_options(p, patch=False)
    p.set_defaults(func=identity_create)

    def identity_list(args: argparse.Namespace) -> int:
        from triogate.admin.customer_endpoints import IdentityListQuery

        raw = {"limit": args.limit, "cursor": args.cursor, "external_id": args.external_id}
        query = convert_all(
            {k: v for k, v in raw.items() if v is not None}, IdentityListQuery, strict=False
        )

        async def run(gw: Services) -> Any:
            return gw.identities.list(
                limit=query.limit, cursor=query.cursor, external_id=query.external_id
            )

        show(args, with_services(args, run), _pages(_identity_line, "no identities"))
        return 0

    p = ids.add_parser("list", help="list identities, newest first")
    data_options(p)
    p.add_argument("--external-id", help="only the identity with this external id")
    p.add_argument("--limit", type=int, default=50, help="per page, 1-100 (default 50)")
    p.add_argument("--cursor", help="the next cursor a previous page printed")
    p.set_defaults(func=identity_list)

    one("get", "show one identity", lambda gw, a: gw.identities.get(a.id), _identity_line, ids)
    one(
        "usage",
        "an identity's keys' usage, summed, and its pool's credits",
        lambda gw, a: gw.identities.usage(a.id),
        _usage_lines,
        ids,
    )

    def identity_patch(args: argparse.Namespace) -> int:
        raw: dict[str, Any] = {}
        for option, field in (
            ("external_id", "external_id"),
            ("name", "name"),
            ("plan", "plan_id"),
        ):
            if getattr(args, option) is not None:
                raw[field] = getattr(args, option)
        if args.metadata is not None:
            raw["metadata"] = _metadata(args.metadata)
        if args.no_plan:
            raw["plan_id"] = None
        if args.disable:
            raw["enabled"] = False
        if args.enable:
            raw["enabled"] = True
        limits_and_credits(args, raw)
        if not raw:
            raise ValidationError([FieldError("$", "nothing to change: give an option")])
        req = convert_all(raw, UpdateIdentityRequest, strict=False)
        updated = with_services(args, lambda gw: gw.identities.update(args.id, req, CLI_ACTOR))
        show(args, updated, _identity_line)
        return 0

    p = ids.add_parser("patch", help="change an identity (--disable suspends all its keys)")
    data_options(p)
    p.add_argument("id", metavar="IDN_ID", help="the identity's id (idn_…)")
    p.add_argument("--external-id", help="a new external id (unique)")
    p.add_argument("--name", help="a new name")
    p.add_argument("--metadata", help="a JSON object")
    p.add_argument("--plan", metavar="PLN_ID", help="put the identity on this plan")
    p.add_argument("--no-plan", action="store_true", help="take the identity off its plan")
    state = p.add_mutually_exclusive_group()
    state.add_argument("--disable", action="store_true", help="suspend it and all its keys")
    state.add_argument("--enable", action="store_true", help="restore a disabled identity")
    limit_options(p, patch=True)
    p.set_defaults(func=identity_patch)

    def identity_delete(args: argparse.Namespace) -> int:
        deleted = with_services(
            args,
            lambda gw: gw.identities.delete(args.id, CLI_ACTOR, revoke_keys=args.revoke_keys),
        )
        show(
            args,
            deleted,
            lambda d: f"{d.id} deleted; revoked keys: {', '.join(d.revoked_keys) or 'none'}",
        )
        return 0

    p = ids.add_parser("delete", help="delete an identity (refused while it has live keys)")
    data_options(p)
    p.add_argument("id", metavar="IDN_ID", help="the identity's id (idn_…)")
    p.add_argument("--revoke-keys", action="store_true", help="revoke its live keys too")
    p.set_defaults(func=identity_delete)

    # -- plans ---------------------------------------------------------------------

    plans = sub.add_parser("plans", help="manage plans").add_subparsers(
        dest="plans_command", required=True
    )

    def plan_create(args: argparse.Namespace) -> int:
        raw: dict[str, Any] = {"name": args.name, "scopes": args.scope or []}
        limits_and_credits(args, raw)
        req = convert_all(raw, CreatePlanRequest, strict=False)
        show(args, with_services(args, lambda gw: gw.plans.create(req, CLI_ACTOR)), _plan_line)
        return 0

    p = plans.add_parser("create", help="create a plan")
    data_options(p)
    p.add_argument("--name", required=True, help="the plan's name (unique)")
    p.add_argument("--scope", action="append", help="a scope its members get, repeatable")
    limit_options(p, patch=False)
    p.set_defaults(func=plan_create)

    def plan_list(args: argparse.Namespace) -> int:
        from triogate.admin.customer_endpoints import PlanListQuery

        raw = {"limit": args.limit, "cursor": args.cursor}
        query = convert_all(
            {k: v for k, v in raw.items() if v is not None}, PlanListQuery, strict=False
        )

        async def run(gw: Services) -> Any:
            return gw.plans.list(limit=query.limit, cursor=query.cursor)

        show(args, with_services(args, run), _pages(_plan_line, "no plans"))
        return 0

    p = plans.add_parser("list", help="list plans, newest first")
    data_options(p)
    p.add_argument("--limit", type=int, default=50, help="plans per page, 1-100 (default 50)")
    p.add_argument("--cursor", help="the next cursor a previous page printed")
    p.set_defaults(func=plan_list)

    one("get", "show one plan", lambda gw, a: gw.plans.get(a.id), _plan_line, plans)

    def plan_patch(args: argparse.Namespace) -> int:
        raw: dict[str, Any] = {}
        if args.name is not None:
            raw["name"] = args.name
        if args.scope:
            raw["scopes"] = args.scope
        if args.clear_scopes:
            raw["scopes"] = []
        limits_and_credits(args, raw)
        if not raw:
            raise ValidationError([FieldError("$", "nothing to change: give an option")])
        req = convert_all(raw, UpdatePlanRequest, strict=False)
        updated = with_services(args, lambda gw: gw.plans.update(args.id, req, CLI_ACTOR))
        show(args, updated, _plan_line)
        return 0

    p = plans.add_parser("patch", help="change a plan (every key on it, next request on)")
    data_options(p)
    p.add_argument("id", metavar="PLN_ID", help="the plan's id (pln_…)")
    p.add_argument("--name", help="a new name (unique)")
    p.add_argument("--scope", action="append", help="the new scopes, repeatable")
    p.add_argument("--clear-scopes", action="store_true", help="set the scopes to none")
    limit_options(p, patch=True)
    p.set_defaults(func=plan_patch)

    one(
        "delete",
        "delete a plan nothing is on",
        lambda gw, a: gw.plans.delete(a.id, CLI_ACTOR),
        lambda d: f"{d.id} deleted",
        plans,
    )
