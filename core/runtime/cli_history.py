"""``triogate keys usage-history KEY_ID`` and ``triogate identities
usage-history IDN_ID``: the admin API's usage history (``GET
/keys/{id}/usage/history``) on the data directory, as a table or, with
``--json``, the API's own JSON.

``cli`` registers these (after ``cli_customers`` made ``identities``) and
lends its helpers, so this module does not import it back."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any

from triogate.control.history import HistoryQuery, UsageHistory
from triogate.runtime.gateway import Services
from triogate.validation import convert_all

__all__ = ["add_history_commands", "history_table"]

WithServices = Callable[[argparse.Namespace, Callable[[Services], Awaitable[Any]]], Any]
Printer = Callable[[argparse.Namespace, Any, Callable[[Any], str]], None]
DataOptions = Callable[[argparse.ArgumentParser], None]

_COLUMNS = ("total", "allowed", "rate_limited", "quota_exceeded", "invalid", "upstream_error")
_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def _time(value: Any) -> str:
    return str(value.isoformat().replace("+00:00", "Z"))


def history_table(h: UsageHistory) -> str:
    """One row per bucket with requests, oldest first."""
    head = f"{h.id}  {h.granularity} buckets from {_time(h.from_)} to {_time(h.to)}"
    if not h.items:
        return f"{head}\nno requests"
    names = ("start", *_COLUMNS, *_CLASSES)
    rows = [
        (
            _time(i.start),
            *(str(getattr(i, c)) for c in _COLUMNS),
            *(str(i.by_status_class[c]) for c in _CLASSES),
        )
        for i in h.items
    ]
    widths = [max(len(n), *(len(r[k]) for r in rows)) for k, n in enumerate(names)]
    lines = [
        "  ".join(
            cell.ljust(w) if k == 0 else cell.rjust(w)
            for k, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in (names, *rows)
    ]
    return "\n".join([head, *lines])


def _query(args: argparse.Namespace) -> HistoryQuery:
    raw: dict[str, Any] = {"granularity": args.granularity}
    if args.from_ is not None:
        raw["from"] = args.from_
    if args.to is not None:
        raw["to"] = args.to
    # The API's own checks: an unknown granularity or a bad time is a
    # VALIDATION_ERROR naming the option's field.
    return convert_all(raw, HistoryQuery, strict=False)


def _subcommands(parser: argparse.ArgumentParser) -> Any:
    """The subcommands of ``parser`` (``identities`` is made elsewhere)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise LookupError(f"{parser.prog} has no subcommands")


def add_history_commands(
    sub: Any, keys: Any, data_options: DataOptions, with_services: WithServices, show: Printer
) -> None:
    """``usage-history`` under ``keys`` and under ``identities`` (a
    subcommand of ``sub``)."""

    def command(
        group: Any, helptext: str, read: Callable[[Services, str, HistoryQuery], Any]
    ) -> None:
        def func(args: argparse.Namespace) -> int:
            query = _query(args)

            async def call(gw: Services) -> Any:
                return read(gw, args.id, query)

            show(args, with_services(args, call), history_table)
            return 0

        p: argparse.ArgumentParser = group.add_parser("usage-history", help=helptext)
        data_options(p)
        p.add_argument("id", help="its id (key_… or idn_…)")
        p.add_argument(
            "--granularity",
            default="hour",
            help="minute, hour (default) or day",
        )
        p.add_argument(
            "--from", dest="from_", metavar="TIME", help="RFC 3339; default: a span before --to"
        )
        p.add_argument("--to", metavar="TIME", help="RFC 3339, exclusive; default: now")
        p.set_defaults(func=func)

    command(
        keys,
        "a key's requests by outcome and status class per minute, hour or day",
        lambda gw, key_id, q: gw.history.key_history(key_id, q),
    )
    command(
        _subcommands(sub.choices["identities"]),
        "an identity's requests by outcome and status class per minute, hour or day",
        lambda gw, idn, q: gw.history.identity_history(idn, q),
    )
