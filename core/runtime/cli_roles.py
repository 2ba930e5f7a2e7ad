"""``triogate roles create|list|get|patch|delete``: the ``/roles`` admin API
on the data directory, as ``triogate keys`` is for keys. A role is given by
its id (``rol_…``) or by its name.

``cli`` registers these (``add_role_commands``) and lends its helpers
(options, opening the services, printing), so this module does not import
it back."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from triogate.control.audit import Actor
from triogate.control.roles import CreateRoleRequest, UpdateRoleRequest
from triogate.runtime.gateway import Services
from triogate.validation import convert_all

__all__ = ["add_role_commands"]

T = TypeVar("T")
WithServices = Callable[[argparse.Namespace, Callable[[Services], Awaitable[Any]]], Any]
Printer = Callable[[argparse.Namespace, Any, Callable[[Any], str]], None]
CLI_ACTOR = Actor("cli", None)


def _role_line(r: Any) -> str:
    scopes = ",".join(r.scopes) or "-"
    line = f"{r.id}  {r.name}  scopes={scopes}"
    return f"{line}  {r.description!r}" if r.description else line


def _page_lines(p: Any) -> str:
    lines = [_role_line(r) for r in p.items]
    if p.next_cursor:
        lines.append(f"next cursor: {p.next_cursor}")
    return "\n".join(lines) or "no roles"


def add_role_commands(
    sub: Any,
    data_options: Callable[[argparse.ArgumentParser], None],
    with_services: WithServices,
    show: Printer,
) -> None:
    """Add ``roles ...`` to the ``triogate`` subcommands ``sub``."""

    def create(args: argparse.Namespace) -> int:
        raw: dict[str, Any] = {"name": args.name, "scopes": args.scope or []}
        if args.description is not None:
            raw["description"] = args.description
        req = convert_all(raw, CreateRoleRequest)
        show(args, with_services(args, lambda gw: gw.roles.create(req, CLI_ACTOR)), _role_line)
        return 0

    def list_(args: argparse.Namespace) -> int:
        from triogate.admin.role_endpoints import RoleListQuery

        raw = {"limit": args.limit, "cursor": args.cursor}
        query = convert_all({k: v for k, v in raw.items() if v is not None}, RoleListQuery)

        async def run(gw: Services) -> Any:
            return gw.roles.list(limit=query.limit, cursor=query.cursor)

        show(args, with_services(args, run), _page_lines)
        return 0

    def get(args: argparse.Namespace) -> int:
        async def run(gw: Services) -> Any:
            return gw.roles.get(gw.roles.resolve(args.role))

        show(args, with_services(args, run), _role_line)
        return 0

    def patch(args: argparse.Namespace) -> int:
        raw: dict[str, Any] = {}
        if args.name is not None:
            raw["name"] = args.name
        if args.clear_scopes or args.scope:
            raw["scopes"] = args.scope or []
        if args.description is not None:
            raw["description"] = args.description
        req = convert_all(raw, UpdateRoleRequest)

        async def run(gw: Services) -> Any:
            return await gw.roles.update(gw.roles.resolve(args.role), req, CLI_ACTOR)

        show(args, with_services(args, run), _role_line)
        return 0

    def delete(args: argparse.Namespace) -> int:
        async def run(gw: Services) -> Any:
            return await gw.roles.delete(gw.roles.resolve(args.role), CLI_ACTOR)

        show(args, with_services(args, run), lambda r: f"{r.id} ({r.name}) deleted")
        return 0

    roles = sub.add_parser("roles", help="manage roles (named bundles of scopes)")
    commands = roles.add_subparsers(dest="roles_command", required=True)

    p = commands.add_parser("create", help="create a role")
    data_options(p)
    p.add_argument("--name", required=True, help="the role's name: what keys name")
    p.add_argument("--scope", action="append", help="repeatable; none: a role without scopes")
    p.add_argument("--description", help="a sentence for people")
    p.set_defaults(func=create)

    p = commands.add_parser("list", help="list roles, newest first")
    data_options(p)
    p.add_argument("--limit", type=int, default=50, help="roles per page, 1-100 (default 50)")
    p.add_argument("--cursor", help="the next cursor a previous page printed")
    p.set_defaults(func=list_)

    p = commands.add_parser("get", help="show one role")
    data_options(p)
    p.add_argument("role", help="its id (rol_…) or name")
    p.set_defaults(func=get)

    p = commands.add_parser("patch", help="change a role's name, scopes or description")
    data_options(p)
    p.add_argument("role", help="its id (rol_…) or name")
    p.add_argument("--name", help="rename (only while no key names the role)")
    p.add_argument("--scope", action="append", help="the new scopes, repeatable")
    p.add_argument("--clear-scopes", action="store_true", help="set the scopes to none")
    p.add_argument("--description", help="a new sentence for people")
    p.set_defaults(func=patch)

    p = commands.add_parser("delete", help="delete a role no key names")
    data_options(p)
    p.add_argument("role", help="its id (rol_…) or name")
    p.set_defaults(func=delete)
