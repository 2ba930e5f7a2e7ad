"""The ``triogate`` command line (argparse).

``keys``, ``admin``, ``identities``, ``plans``, ``roles``, ``audit``,
``events`` and ``maintenance`` work directly on the data directory: LMDB is
multi-process safe, so they may run while a server is serving the same data
(each write is one transaction, as the admin API's are). What only a running
server holds (its config and history, routes, upstreams, cluster, metrics) is
asked of its admin API (``cli_server``). docs/cli.md lists every command.
Errors are the gateway's own (``GatewayError``), printed as ``CODE: detail``
with exit status 1; usage errors exit 2. A data directory that is not what
it was (``core/datadir.py``) is one sentence on stderr and exit status 1,
for ``serve`` and every command that opens it; ``doctor`` says more.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import tomllib
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import trio

from triogate import __version__
from triogate.config import Config, load_config
from triogate.control.audit import Actor
from triogate.control.crypto import add_hmac_version
from triogate.control.models import CreateAdminRequest, CreateKeyRequest, RotateKeyRequest
from triogate.errors import (
    ConfigError,
    FieldError,
    GatewayError,
    SecretsError,
    StoreError,
    ValidationError,
)
from triogate.runtime.cli_admin import add_admin_commands
from triogate.runtime.cli_credits import add_credit_commands
from triogate.runtime.cli_customers import (
    add_customer_commands,
    add_key_customer_options,
    key_customer_fields,
)
from triogate.runtime.cli_history import add_history_commands
from triogate.runtime.cli_keyexport import add_keyexport_commands
from triogate.runtime.cli_roles import add_role_commands
from triogate.runtime.cli_server import add_server_commands
from triogate.runtime.cli_tools import add_echo_command, global_options_everywhere, run_bench
from triogate.runtime.gateway import Services, open_services
from triogate.validation import convert_all

__all__ = ["main"]

T = TypeVar("T")
CLI_ACTOR = Actor("cli", None)
_json = msgspec.json.Encoder()


def _config_for(args: argparse.Namespace) -> Config:
    config = load_config(Path(args.config) if args.config else None)
    if getattr(args, "data_dir", None):
        config = msgspec.structs.replace(
            config, server=msgspec.structs.replace(config.server, data_dir=args.data_dir)
        )
    return config


def _with_gateway(args: argparse.Namespace, fn: Callable[[Services], Awaitable[T]]) -> T:
    config = _config_for(args)

    async def run() -> T:
        async with open_services(config) as gw:
            return await fn(gw)

    return trio.run(run)


def _print(args: argparse.Namespace, obj: Any, human: Callable[[Any], str]) -> None:
    if args.json:
        print(_json.encode(obj).decode())
    else:
        print(human(obj))


def _parse_rate_limit(text: str) -> dict[str, Any]:
    """``name=limit/seconds``, e.g. ``burst=10/1``."""
    name, _, rest = text.partition("=")
    limit, _, period = rest.partition("/")
    try:
        return {"name": name, "limit": int(limit), "period_seconds": float(period)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected name=limit/seconds, got {text!r}") from None


def _key_line(k: Any) -> str:
    expires = k.expires_at.isoformat() if k.expires_at else "never"
    scopes = ",".join(k.scopes) or "-"
    line = (
        f"{k.id}  {k.status:<8} {k.start}…  {k.name!r} owner={k.owner!r} "
        f"scopes={scopes} expires={expires}"
    )
    extras = [f"identity={k.identity_id}"] if k.identity_id else []
    extras += [f"plan={k.plan_id}"] if k.plan_id else []
    extras += [f"roles={','.join(k.roles)}"] if k.roles else []
    extras += ["DISABLED"] if not k.enabled else []
    return " ".join([line, *extras])


# ---- commands -------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from triogate.runtime.server import run_server
    from triogate.telemetry.logs import configure_logging

    config = _config_for(args)
    # The served gateway logs as [log] says; --log-level still wins.
    configure_logging(config.log, level=args.log_level)
    if args.server:
        config = msgspec.structs.replace(
            config, server=msgspec.structs.replace(config.server, proxy_server=args.server)
        )
    workers = config.server.workers
    if workers > 1 and args.worker is None:
        from triogate.runtime.supervisor import run_supervisor

        # Settled once here: a damaged data directory is one refusal, not N
        # workers restarted in a loop.
        _with_gateway(args, _nothing)
        return run_supervisor(args.config, workers, args.server)
    worker = (args.worker, workers) if args.worker is not None else (0, 1)
    return run_server(config, source=args.config, worker=worker)


async def _nothing(gw: Services) -> None:
    return None


def cmd_doctor(args: argparse.Namespace) -> int:
    from triogate.runtime.doctor import main as doctor_main

    return doctor_main(_config_for(args).data_dir, as_json=args.json)


def cmd_demo(args: argparse.Namespace) -> int:
    from triogate.runtime.demo import main as demo_main

    return demo_main(
        proxy_port=args.proxy_port,
        admin_port=args.admin_port,
        data_dir=args.data_dir,
        print_config=args.print_config,
    )


def cmd_check_config(args: argparse.Namespace) -> int:
    from triogate.runtime.configcheck import check_document

    # Read once: the checksum printed is of exactly the bytes validated.
    path = Path(args.file)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([FieldError("$", f"cannot read: {exc.strerror}")], args.file) from None
    try:
        doc = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError([FieldError("$", f"invalid TOML: {exc}")], args.file) from None
    # Every error in one pass: fields, references, routes and every plugin's
    # settings, compiled exactly as serve would; nothing opened or bound.
    config = check_document(doc, args.file)
    # The checksum of the bytes read (a reload reads the file again: compare
    # with `sha256sum FILE` to know the file is still the one checked).
    digest = hashlib.sha256(raw).hexdigest()
    print(
        f"{args.file}: OK ({len(config.routes)} routes, {len(config.upstreams)} upstreams)"
        f" sha256:{digest}"
    )
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    raw: dict[str, Any] = {"name": args.name, "owner": args.owner, "scopes": args.scope or []}
    if args.expires_at:
        raw["expires_at"] = args.expires_at
    if args.rate_limit:
        raw["rate_limits"] = args.rate_limit
    if args.credits is not None:
        raw["credits"] = {"remaining": args.credits}
    if args.keyspace is not None:
        raw["keyspace"] = args.keyspace
    raw.update(key_customer_fields(args))
    req = convert_all(raw, CreateKeyRequest, strict=False)
    created = _with_gateway(args, lambda gw: gw.keys.create(req, CLI_ACTOR))
    _print(
        args,
        created,
        lambda k: f"{_key_line(k)}\nkey: {k.key}\n(store it now: it is not shown again)",
    )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from triogate.admin.endpoints import KeyListQuery

    raw = {
        "limit": args.limit,
        "cursor": args.cursor,
        "owner": args.owner,
        "status": args.status,
        "identity_id": args.identity,
    }
    query = convert_all({k: v for k, v in raw.items() if v is not None}, KeyListQuery)

    async def run(gw: Services) -> Any:
        return gw.keys.list(
            limit=query.limit,
            cursor=query.cursor,
            owner=query.owner,
            status=query.status,
            identity_id=query.identity_id,
        )

    page = _with_gateway(args, run)

    def human(p: Any) -> str:
        lines = [_key_line(k) for k in p.items]
        if p.next_cursor:
            lines.append(f"next cursor: {p.next_cursor}")
        return "\n".join(lines) or "no keys"

    _print(args, page, human)
    return 0


def cmd_keys_get(args: argparse.Namespace) -> int:
    async def run(gw: Services) -> Any:
        return gw.keys.get(args.id)

    _print(args, _with_gateway(args, run), _key_line)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    result = _with_gateway(args, lambda gw: gw.keys.revoke(args.id, CLI_ACTOR))
    _print(args, result, lambda r: f"{r.id} revoked at {r.revoked_at.isoformat()}")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    req = convert_all({"grace_seconds": args.grace_seconds}, RotateKeyRequest)
    result = _with_gateway(args, lambda gw: gw.keys.rotate(args.id, req, CLI_ACTOR))
    _print(
        args,
        result,
        lambda r: (
            f"{r.old.id} rotated; works until {r.old.grace_ends_at.isoformat()}\n"
            f"{_key_line(r.new)}\nkey: {r.new.key}"
        ),
    )
    return 0


def cmd_admin_create(args: argparse.Namespace) -> int:
    raw: dict[str, Any] = {"name": args.name, "email": args.email}
    if args.permission:
        raw["permissions"] = args.permission
    else:
        raw["role"] = args.role
    req = convert_all(raw, CreateAdminRequest)
    created = _with_gateway(args, lambda gw: gw.admins.create(req, CLI_ACTOR))
    _print(
        args,
        created,
        lambda a: (
            f"{a.id} {a.name} <{a.email}> role={a.role} "
            f"permissions={','.join(a.permissions)}\nkey: {a.key}"
        ),
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    return run_bench(args.bench_args)


def cmd_secrets_rotate_hmac(args: argparse.Namespace) -> int:
    config = _config_for(args)
    _with_gateway(args, _nothing)  # only on a data directory that is what it was
    version = add_hmac_version(config.data_dir)
    print(f"HMAC secret version {version} is now current; existing keys keep working")
    return 0


# ---- parser ---------------------------------------------------------------


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="config file (its server.data_dir is used)")
    p.add_argument("--data-dir", help="data directory (overrides the config's)")
    p.add_argument("--json", action="store_true", help="print JSON (the admin API's shapes)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triogate", description="An API gateway on trio.")
    parser.add_argument("--version", action="version", version=f"triogate {__version__}")
    parser.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default: INFO; for serve, [log] level in the config",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("-c", "--config", help="config file (default: embedded defaults)")
    p.add_argument(
        "--server",
        choices=["native", "hypercorn"],
        help="proxy front door (default: server.proxy_server, native)",
    )
    # Set by the supervisor of server.workers > 1 for each worker it starts.
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)

    from triogate.runtime.demo import DEFAULT_ADMIN_PORT, DEFAULT_DATA_DIR, DEFAULT_PROXY_PORT

    p = sub.add_parser(
        "demo",
        help="the gateway on a bundled config and echo upstream, with keys and curl lines",
    )
    for name, default in (
        ("--proxy-port", DEFAULT_PROXY_PORT),
        ("--admin-port", DEFAULT_ADMIN_PORT),
    ):
        p.add_argument(name, type=int, default=default, metavar="PORT", help=f"default: {default}")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="default: %(default)s")
    p.add_argument("--print-config", action="store_true", help="print the bundled config, exit")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "doctor", help="check a data directory offline: files, secrets, every record"
    )
    _data_options(p)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser(
        "check-config", help="validate a config file, print every error and its sha256"
    )
    p.add_argument("file", metavar="FILE", help="the TOML config file to check")
    p.set_defaults(func=cmd_check_config)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True
    )
    p = keys.add_parser("create", help="create a key; prints the plaintext once")
    _data_options(p)
    p.add_argument("--name", required=True, help="a label for people, e.g. 'CI key'")
    p.add_argument("--owner", required=True, help="who holds the key (sealed at rest)")
    p.add_argument("--scope", action="append", help="a scope the key carries, repeatable")
    p.add_argument("--expires-at", help="RFC 3339, e.g. 2027-01-01T00:00:00Z")
    p.add_argument(
        "--rate-limit",
        action="append",
        type=_parse_rate_limit,
        help="name=limit/seconds, repeatable",
    )
    p.add_argument("--credits", type=int, help="requests the key may make (a quota)")
    p.add_argument("--keyspace", help="a [keyspaces.NAME] of the config (default: default)")
    add_key_customer_options(p)
    p.set_defaults(func=cmd_keys_create)

    p = keys.add_parser("list", help="list keys, newest first")
    _data_options(p)
    p.add_argument("--owner", help="only the keys of this owner")
    p.add_argument(
        "--status",
        choices=["active", "revoked", "rotated", "expired"],
        help="only the keys in this state",
    )
    p.add_argument("--identity", metavar="IDN_ID", help="only the keys of this identity")
    p.add_argument("--limit", type=int, default=50, help="keys per page, 1-100 (default 50)")
    p.add_argument("--cursor", help="the next cursor a previous page printed")
    p.set_defaults(func=cmd_keys_list)

    for name, func, helptext in (
        ("get", cmd_keys_get, "show one key"),
        ("revoke", cmd_keys_revoke, "revoke a key"),
    ):
        p = keys.add_parser(name, help=helptext)
        _data_options(p)
        p.add_argument("id", metavar="KEY_ID", help="the key's id (key_…)")
        p.set_defaults(func=func)

    p = keys.add_parser("rotate", help="issue a replacement key with a grace period")
    _data_options(p)
    p.add_argument("id", metavar="KEY_ID", help="the key's id (key_…)")
    p.add_argument(
        "--grace-seconds",
        type=int,
        default=86400,
        help="how long the old key keeps working (default 86400: a day)",
    )
    p.set_defaults(func=cmd_keys_rotate)

    admin = sub.add_parser(
        "admin", aliases=["admins"], help="manage admin users (also: admins)"
    ).add_subparsers(dest="admin_command", required=True)
    p = admin.add_parser("create", help="create an admin; prints its key once")
    _data_options(p)
    p.add_argument("--name", required=True, help="the admin's name")
    p.add_argument("--email", required=True, help="the admin's e-mail (sealed at rest)")
    p.add_argument(
        "--role",
        default="super_admin",
        choices=["super_admin", "key_admin", "key_viewer", "auditor"],
        help="what the admin may do (default super_admin; docs/admin-api.md lists the roles)",
    )
    p.add_argument(
        "--permission", action="append", help="explicit permission instead of a role, repeatable"
    )
    p.set_defaults(func=cmd_admin_create)

    p = sub.add_parser(
        "bench", help="run a benchmark (same as python -m benchmarks); no NAME: list them"
    )
    p.add_argument(
        "bench_args",
        nargs=argparse.REMAINDER,
        metavar="NAME [options]",
        help="a benchmark and its options; without one, the benchmarks are listed",
    )
    p.set_defaults(func=cmd_bench)

    secrets = sub.add_parser("secrets", help="server secrets").add_subparsers(
        dest="secrets_command", required=True
    )
    p = secrets.add_parser(
        "rotate-hmac", help="add a new current HMAC secret version (file-based secrets)"
    )
    _data_options(p)
    p.set_defaults(func=cmd_secrets_rotate_hmac)
    add_role_commands(sub, _data_options, _with_gateway, _print)
    add_keyexport_commands(keys, _data_options, _with_gateway)
    add_customer_commands(
        sub, keys, _data_options, _with_gateway, _print, _parse_rate_limit, _key_line
    )
    add_credit_commands(sub, keys, _data_options, _with_gateway, _print)
    add_history_commands(sub, keys, _data_options, _with_gateway, _print)
    add_admin_commands(sub, keys, _data_options, _with_gateway, _print)
    add_server_commands(sub)
    add_echo_command(sub)
    global_options_everywhere(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level or "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        status: int = args.func(args)
    except ConfigError as exc:
        for line in exc.lines():
            print(f"{exc.source}: {line}", file=sys.stderr)
        return 1
    except ValidationError as exc:
        for e in exc.errors:
            print(f"VALIDATION_ERROR: {e.path}: {e.message}", file=sys.stderr)
        return 1
    except GatewayError as exc:
        print(f"{exc.code}: {exc.detail}", file=sys.stderr)
        return 1
    except StoreError as exc:  # the data directory is not what it was
        print(f"triogate: {exc}", file=sys.stderr)
        return 1
    except SecretsError as exc:
        print(f"secrets: {exc}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
