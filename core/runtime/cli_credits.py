"""``triogate keys credits KEY_ID set|increment|decrement N`` and ``triogate
identities credits IDN_ID …``: the admin API's credit operations
(``control.credits``) on the data directory, printing the new balance.

The CLI is a process of its own: the operation is applied by this process's
actors (loaded from storage) and flushed before the command ends. With no
server running that is exact; next to a running server, use the admin API
(``POST /keys/{id}/credits``), whose owner is the server's own actors and is
exact under load (docs/metering.md says why). On a cluster node (``[cluster]
redis_url``) the balance is Redis's: the command opens the cluster's limits
for its run, so the operation is the same script run the admin API makes,
exact against every node's spending (Redis unreachable: 503's message,
exit status 1, nothing changed).

``cli`` registers these and lends its helpers, so this module does not import
it back."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from triogate.cluster.limits import open_cluster_limits
from triogate.config import Config, load_config
from triogate.control.audit import Actor
from triogate.control.credits import CreditOp, CreditsResult
from triogate.runtime.cli_customers import DataOptions, Printer, WithServices
from triogate.runtime.gateway import Services
from triogate.validation import convert_all

__all__ = ["add_credit_commands"]

CLI_ACTOR = Actor("cli", None)
OPS = ("set", "increment", "decrement")


def _line(result: CreditsResult) -> str:
    return (
        f"{result.id}  {result.op} {result.amount}: "
        f"{result.previous_remaining} -> {result.credits_remaining} credits"
    )


def _config_for(args: argparse.Namespace) -> Config:
    # As ``cli._config_for`` (which this module must not import).
    config = load_config(Path(args.config) if getattr(args, "config", None) else None)
    if getattr(args, "data_dir", None):
        config = msgspec.structs.replace(
            config, server=msgspec.structs.replace(config.server, data_dir=args.data_dir)
        )
    return config


async def _on_balances(
    args: argparse.Namespace, gw: Services, fn: Callable[[], Awaitable[CreditsResult]]
) -> CreditsResult:
    """``fn`` with the balances' owner: on a cluster node, the cluster's
    limits (Redis holds the balances) for the command's run."""
    cluster = _config_for(args).cluster
    if cluster.redis_url is None or gw.actors.cluster is not None:
        return await fn()
    try:
        async with open_cluster_limits(cluster) as limits:
            gw.actors.cluster = limits
            try:
                return await fn()
            finally:
                gw.actors.cluster = None
    except BaseExceptionGroup as group:
        # The batcher's nursery wraps the command's own error (a 503, a 409):
        # printed as the gateway's error, not as a traceback.
        inner: BaseException = group
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        raise inner from None


def _subparsers(parser: argparse.ArgumentParser) -> Any:
    """The subcommands of ``parser`` (``identities``, made by ``cli_customers``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise LookupError(f"{parser.prog} has no subcommands")


def add_credit_commands(
    sub: Any, keys: Any, data_options: DataOptions, with_services: WithServices, show: Printer
) -> None:
    """Add ``credits`` to the ``keys`` subcommands and to ``identities``'
    (registered after ``cli_customers.add_customer_commands``)."""

    def options(p: argparse.ArgumentParser, what: str) -> None:
        data_options(p)
        p.add_argument("id", metavar=what, help="its id")
        p.add_argument("op", choices=OPS, help="set the balance, or add to or take from it")
        p.add_argument("amount", type=int, help="1 to 10^15 (set: 0 to 10^15)")

    def keys_credits(args: argparse.Namespace) -> int:
        req = convert_all({"op": args.op, "amount": args.amount}, CreditOp)

        async def run(gw: Services) -> CreditsResult:
            return await _on_balances(
                args, gw, lambda: gw.credits.change_key(args.id, req, CLI_ACTOR)
            )

        show(args, with_services(args, run), _line)
        return 0

    def identities_credits(args: argparse.Namespace) -> int:
        req = convert_all({"op": args.op, "amount": args.amount}, CreditOp)

        async def run(gw: Services) -> CreditsResult:
            return await _on_balances(
                args, gw, lambda: gw.credits.change_identity(args.id, req, CLI_ACTOR)
            )

        show(args, with_services(args, run), _line)
        return 0

    p = keys.add_parser("credits", help="set, increment or decrement a key's credit balance")
    options(p, "KEY_ID")
    p.set_defaults(func=keys_credits)
    identities = _subparsers(sub.choices["identities"])
    p = identities.add_parser(
        "credits", help="set, increment or decrement an identity's pooled credit balance"
    )
    options(p, "IDN_ID")
    p.set_defaults(func=identities_credits)
