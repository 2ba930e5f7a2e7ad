"""The admin API's remaining data-directory actions in the CLI: ``keys
usage``, ``keys validate``, ``admin list|revoke``, ``audit list``,
``maintenance cleanup`` and ``events list|get|retry`` (the webhook delivery
log). Like every ``keys``/``admin`` command they work on the data directory
(LMDB is multi-process safe: they may run while a server serves it); the
server's own in-memory state (config, routes, upstreams) is ``cli_server``'s.

``cli`` registers these and lends its helpers, so this module does not
import it back."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from triogate.control.audit import Actor
from triogate.control.models import ValidateKeyRequest
from triogate.errors import ValidationError
from triogate.runtime.gateway import Services
from triogate.validation import convert_all

__all__ = ["add_admin_commands"]

WithServices = Callable[[argparse.Namespace, Callable[[Services], Awaitable[Any]]], Any]
Printer = Callable[[argparse.Namespace, Any, Callable[[Any], str]], None]
DataOptions = Callable[[argparse.ArgumentParser], None]
CLI_ACTOR = Actor("cli", None)


def _time(value: Any) -> str:
    return "never" if value is None else str(value.isoformat().replace("+00:00", "Z"))


def _pages(line: Callable[[Any], str], empty: str) -> Callable[[Any], str]:
    def human(p: Any) -> str:
        lines = [line(item) for item in p.items]
        if getattr(p, "next_cursor", None):
            lines.append(f"next cursor: {p.next_cursor}")
        return "\n".join(lines) or empty

    return human


def _usage(u: Any) -> str:
    classes = " ".join(f"{k}={v}" for k, v in u.by_status_class.items())
    limits = ",".join(f"{r.name}={r.limit}/{r.period_seconds:g}" for r in u.rate_limits) or "-"
    credits = "-" if u.credits_remaining is None else str(u.credits_remaining)
    return (
        f"{u.key_id}  requests={u.requests} last_used={_time(u.last_used_at)} "
        f"credits_remaining={credits} limits={limits}\n{classes}"
    )


def _validated(r: Any) -> str:
    if not r.valid:
        return f"invalid: {r.code}"
    credits = "-" if r.credits_remaining is None else str(r.credits_remaining)
    scopes = ",".join(r.scopes or []) or "-"
    return f"valid: {r.key_id} owner={r.owner!r} scopes={scopes} credits_remaining={credits}"


def _admin(a: Any) -> str:
    perms = ",".join(a.permissions) or "-"
    return (
        f"{a.id}  {a.status:<7} {a.start}…  {a.name} <{a.email}> role={a.role or '-'} "
        f"permissions={perms} created={_time(a.created_at)}"
    )


def _audit(e: Any) -> str:
    target = e.target_id or "-"
    ip = f" from {e.source_ip}" if e.source_ip else ""
    details = f" {e.details}" if e.details else ""
    return f"{_time(e.at)}  {e.actor_id}{ip}  {e.action}  {target}{details}"


def _delivery(d: Any) -> str:
    last = d.last_status_code if d.last_status_code is not None else (d.last_error or "-")
    return (
        f"{d.id}  {d.status:<9} {d.event_type} -> {d.webhook}  attempts={len(d.attempts)} "
        f"last={last} next={_time(d.next_attempt_at)}"
    )


def _query(raw: dict[str, Any], kind: type[Any]) -> Any:
    return convert_all({k: v for k, v in raw.items() if v is not None}, kind, strict=False)


def _key_text(args: argparse.Namespace) -> str:
    """The key to validate: from ``--key-file`` or standard input (never an
    argument: arguments show in ``ps`` and in the shell's history)."""
    if args.key_file and args.key_file != "-":
        try:
            text = Path(args.key_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValidationError.single("--key-file", f"cannot read: {exc}") from None
    else:
        text = sys.stdin.readline()
    key = text.strip()
    if not key:
        raise ValidationError.single("key", "no key given (on standard input or --key-file)")
    return key


def _subcommands(parser: argparse.ArgumentParser) -> Any:
    """The subcommands of ``parser`` (``admin`` is made by ``cli``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise LookupError(f"{parser.prog} has no subcommands")


def add_admin_commands(
    sub: Any, keys: Any, data_options: DataOptions, with_services: WithServices, show: Printer
) -> None:
    """``keys usage|validate`` under ``keys``; ``admin list|revoke`` under the
    existing ``admin``; new ``audit``, ``maintenance`` and ``events``."""

    def command(
        group: Any,
        name: str,
        helptext: str,
        call: Callable[[Services, argparse.Namespace], Any],
        line: Callable[[Any], str],
    ) -> argparse.ArgumentParser:
        def func(args: argparse.Namespace) -> int:
            async def run(gw: Services) -> Any:
                result = call(gw, args)
                return await result if isinstance(result, Awaitable) else result

            show(args, with_services(args, run), line)
            return 0

        p: argparse.ArgumentParser = group.add_parser(name, help=helptext, description=helptext)
        data_options(p)
        p.set_defaults(func=func)
        return p

    # -- keys usage, keys validate --------------------------------------------------

    p = command(
        keys,
        "usage",
        "a key's requests, last use, status classes, credits left and limits",
        lambda gw, a: gw.keys.usage(a.id),
        _usage,
    )
    p.add_argument("id", metavar="KEY_ID", help="the key's id (key_…)")

    async def validate(gw: Services, args: argparse.Namespace) -> Any:
        req = convert_all(
            {"key": args.key, "scopes": args.scope or [], "spend": args.spend},
            ValidateKeyRequest,
        )
        result = await gw.credits.validate(req)
        if req.spend:
            # What this process's actors spent is stored before it exits
            # (a server's flusher would do it on its next round).
            await gw.actors.flush(list(gw.actors.actors.values()))
        return result

    p = command(
        keys,
        "validate",
        "check a key (read from standard input) as the proxy would: verdict, credits, "
        "limits; exit status 1 when it is refused",
        validate,
        _validated,
    )
    p.add_argument("--scope", action="append", help="a scope the key must have, repeatable")
    p.add_argument("--spend", type=int, default=0, help="credits to spend (default 0: only look)")
    p.add_argument(
        "--key-file", metavar="FILE", help="read the key from FILE instead of standard input"
    )

    def validate_with_key(args: argparse.Namespace) -> int:
        args.key = _key_text(args)
        result = with_services(args, lambda gw: validate(gw, args))
        show(args, result, _validated)
        return 0 if result.valid else 1  # scripts: `if triogate keys validate ...`

    p.set_defaults(func=validate_with_key)

    # -- admin list, admin revoke ----------------------------------------------------

    admin = _subcommands(sub.choices["admin"])
    command(
        admin,
        "list",
        "list admin users, newest first (never their keys)",
        lambda gw, a: gw.admins.list(),
        _pages(_admin, "no admins"),
    )
    p = command(
        admin,
        "revoke",
        "revoke an admin: its key stops working at once",
        lambda gw, a: gw.admins.revoke(a.id, CLI_ACTOR),
        _admin,
    )
    p.add_argument("id", metavar="ADMIN_ID", help="the admin's id (adm_…)")

    # -- audit -------------------------------------------------------------------------

    audit = sub.add_parser("audit", help="read the audit log").add_subparsers(
        dest="audit_command", required=True, metavar="COMMAND"
    )

    def audit_list(gw: Services, args: argparse.Namespace) -> Any:
        from triogate.admin.endpoints import AuditQuery

        q = _query(
            {
                "limit": args.limit,
                "cursor": args.cursor,
                "actor": args.actor,
                "action": args.action,
            },
            AuditQuery,
        )
        return gw.audit.list(limit=q.limit, cursor=q.cursor, actor=q.actor, action=q.action)

    p = command(
        audit,
        "list",
        "the audit log, newest first, optionally filtered",
        audit_list,
        _pages(_audit, "no audit entries"),
    )
    p.add_argument("--actor", help="only entries by this actor (an admin id, cli or setup)")
    p.add_argument("--action", help="only this action, e.g. key.create or admin.revoke")
    p.add_argument("--limit", type=int, default=50, help="entries per page, 1-100 (default 50)")
    p.add_argument("--cursor", help="the next cursor a previous page printed")

    # -- maintenance -------------------------------------------------------------------

    maintenance = sub.add_parser("maintenance", help="housekeeping of the data directory")
    group = maintenance.add_subparsers(dest="maintenance_command", required=True, metavar="COMMAND")

    async def cleanup(gw: Services, args: argparse.Namespace) -> Any:
        from triogate.control.models import CleanupResult

        expired, purged = await gw.keys.cleanup(CLI_ACTOR)
        return CleanupResult(expired=expired, purged=purged)

    command(
        group,
        "cleanup",
        "mark keys past their expiry expired; purge rotated keys past their grace",
        cleanup,
        lambda r: f"expired {r.expired} keys, purged {r.purged} rotated keys",
    )

    # -- events (the webhook delivery log) ---------------------------------------------

    events = sub.add_parser("events", help="the webhook delivery log").add_subparsers(
        dest="events_command", required=True, metavar="COMMAND"
    )

    def deliveries(gw: Services, args: argparse.Namespace) -> Any:
        from triogate.admin.event_endpoints import DeliveryListQuery

        q = _query(
            {
                "limit": args.limit,
                "cursor": args.cursor,
                "event": args.event,
                "status": args.status,
                "webhook": args.webhook,
            },
            DeliveryListQuery,
        )
        return gw.events.log.list(
            limit=q.limit, cursor=q.cursor, event=q.event, status=q.status, webhook=q.webhook
        )

    p = command(
        events,
        "list",
        "webhook deliveries, newest first: status, attempts, next attempt",
        deliveries,
        _pages(_delivery, "no deliveries"),
    )
    p.add_argument("--event", help="only this event type, e.g. key.revoked")
    p.add_argument(
        "--status", choices=["pending", "delivered", "failed"], help="only deliveries in this state"
    )
    p.add_argument("--webhook", help="only this webhook (its name, or its url)")
    p.add_argument("--limit", type=int, default=50, help="deliveries per page, 1-100 (default 50)")
    p.add_argument("--cursor", help="the next cursor a previous page printed")

    p = command(
        events,
        "get",
        "one delivery with its attempts",
        lambda gw, a: gw.events.log.get(a.id),
        lambda d: "\n".join(
            [_delivery(d)]
            + [
                f"  {_time(t.at)} status={t.status_code if t.status_code is not None else '-'} "
                f"error={t.error or '-'}"
                for t in d.attempts
            ]
        ),
    )
    p.add_argument("id", metavar="DELIVERY_ID", help="the delivery's id (dlv_…)")
    p = command(
        events,
        "retry",
        "deliver a delivered or failed event again, now (a running server sends it)",
        lambda gw, a: gw.events.log.retry(a.id, CLI_ACTOR),
        _delivery,
    )
    p.add_argument("id", metavar="DELIVERY_ID", help="the delivery's id (dlv_…)")
