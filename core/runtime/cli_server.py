"""The running server's own state in the CLI, through its admin API:
``config show|history|reload``, ``routes``, ``upstreams``, ``cluster``,
``health`` and ``metrics``.

These are what a running gateway holds in memory (the config it loaded and
its history, the compiled routes, connection pools and circuit breakers),
so unlike the data-directory commands they ask the server: ``GET /config``
and the others, over HTTP. Where: ``--admin-url`` (or
``TRIOGATE_ADMIN_URL``), else the config's ``server.admin_listen``. As
whom: an admin key from ``TRIOGATE_ADMIN_KEY`` or ``--admin-key-file``
(never an argument: arguments show in ``ps``). The server checks the key's
permissions exactly as for any API call (a 403 is printed as its code, exit status 1).

``cli`` registers these; nothing here imports it back."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

__all__ = ["add_server_commands", "admin_url"]

TIMEOUT_SECONDS = 10.0


class _ApiFailed(Exception):
    """The admin API answered with an error, or could not be reached: one
    line on stderr (``CODE: detail``), exit status 1."""

    def __init__(self, detail: str, code: str = "ADMIN_API_UNREACHABLE") -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def admin_url(args: argparse.Namespace) -> str:
    """``--admin-url``, ``TRIOGATE_ADMIN_URL``, or the config's admin
    listener (a wildcard address is asked on loopback)."""
    given = args.admin_url or os.environ.get("TRIOGATE_ADMIN_URL")
    if given:
        return str(given).rstrip("/")
    from triogate.config import load_config

    listen = load_config(Path(args.config) if args.config else None).server.admin_listen
    host, _, port = str(listen).rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if port in ("", "0"):
        raise _ApiFailed(
            f"server.admin_listen is {listen!r}: give --admin-url (the URL serve printed)"
        )
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def _admin_key(args: argparse.Namespace) -> str | None:
    if args.admin_key_file:
        try:
            return Path(args.admin_key_file).read_text().strip() or None
        except OSError as exc:
            raise _ApiFailed(f"cannot read {args.admin_key_file}: {exc.strerror}") from None
    return os.environ.get("TRIOGATE_ADMIN_KEY") or None


def call(args: argparse.Namespace, method: str, path: str) -> httpx.Response:
    """One admin API request; _ApiFailed for an error answer."""
    url = admin_url(args)
    key = _admin_key(args)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with httpx.Client(base_url=url, timeout=TIMEOUT_SECONDS) as client:
            response = client.request(method, path, headers=headers)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise _ApiFailed(f"cannot reach the admin API at {url}: {exc}") from None
    except UnicodeEncodeError:  # a key (file) with characters no header can carry
        raise _ApiFailed("the admin key is not one: it has characters no key has") from None
    if response.status_code >= 400:
        try:
            problem = response.json()
            code, detail = str(problem.get("code")), str(problem.get("detail"))
        except (ValueError, AttributeError):
            code, detail = f"HTTP_{response.status_code}", response.text[:200]
        if response.status_code == 401 and key is None:
            detail += " (the CLI takes it from TRIOGATE_ADMIN_KEY or --admin-key-file)"
        raise _ApiFailed(f"{detail} ({method} {url}{path})", code)
    return response


def _guarded(action: Callable[[], None]) -> int:
    try:
        action()
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        # A 2xx answer that is not the admin API's JSON (something else
        # listens there, or a proxy in between answers): one line, no traceback.
        print(
            "ADMIN_API_UNEXPECTED: the answer is not the triogate admin API's "
            "(is --admin-url right?)",
            file=sys.stderr,
        )
        return 1
    except _ApiFailed as exc:
        print(f"{exc.code}: {exc.detail}", file=sys.stderr)
        return 1
    return 0


def _show(args: argparse.Namespace, doc: Any, human: Callable[[Any], str]) -> None:
    print(json.dumps(doc) if args.json else human(doc))


def _config_lines(doc: dict[str, Any], *, history: bool) -> str:
    head = (
        f"config {doc['version']} loaded {doc['loaded_at']} from {doc['source'] or '(defaults)'}"
        f"; {doc['reloads']} reloads"
    )
    if not history:
        return head
    rows = [
        f"{'*' if i == 0 else ' '} {v['version']}  {v['loaded_at']}  {v['source'] or '(defaults)'}"
        for i, v in enumerate(doc["history"])
    ]
    return "\n".join([head, "history, newest first (* active):", *rows])


def _routes(doc: dict[str, Any]) -> str:
    lines = []
    for r in doc["items"]:
        chain = " -> ".join(p.get("name", "?") for p in r.get("plugins", [])) or "-"
        methods = ",".join(r.get("methods") or []) or "*"
        lines.append(f"{r.get('name')}  {methods} {r.get('path')}  plugins: {chain}")
    return "\n".join(lines) or "no routes"


def _upstreams(doc: dict[str, Any]) -> str:
    lines = []
    for u in doc["items"]:
        lines.append(f"{u['name']}  balance={u['balance']} in_flight={u['in_flight']}")
        for t in u["targets"]:
            breaker = t.get("breaker")
            state = "-" if breaker is None else breaker["state"]
            lines.append(
                f"  {t['target']}  healthy={t['healthy']} active={t['active']} "
                f"idle={t['idle']} breaker={state}"
            )
    return "\n".join(lines) or "no upstreams"


def _cluster(doc: dict[str, Any]) -> str:
    if doc.get("cluster_id") is None:
        return "not in a cluster"
    lines = [f"cluster {doc['cluster_id']} head_seq={doc['head_seq']}"]
    lines += [f"  {json.dumps(n)}" for n in doc["items"]]
    return "\n".join(lines)


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="config file whose server.admin_listen is asked")
    p.add_argument(
        "--admin-url",
        metavar="URL",
        help="the admin API, e.g. http://127.0.0.1:8001 (default: TRIOGATE_ADMIN_URL, "
        "else the config's server.admin_listen)",
    )
    p.add_argument(
        "--admin-key-file",
        metavar="FILE",
        help="a file holding the admin key (default: the TRIOGATE_ADMIN_KEY variable)",
    )
    p.add_argument("--json", action="store_true", help="print the API's JSON answer")


def add_server_commands(sub: Any) -> None:
    """``config``, ``routes``, ``upstreams``, ``cluster``, ``health`` and
    ``metrics``: the running server's state, over its admin API."""

    def command(
        group: Any, name: str, helptext: str, method: str, path: str, human: Callable[[Any], str]
    ) -> None:
        def func(args: argparse.Namespace) -> int:
            return _guarded(lambda: _show(args, call(args, method, path).json(), human))

        p = group.add_parser(name, help=helptext, description=f"{helptext} ({method} {path}).")
        _options(p)
        p.set_defaults(func=func)

    config = sub.add_parser(
        "config", help="the running server's config: version, history, reload"
    ).add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    command(
        config,
        "show",
        "the active config version, when and from where it was loaded",
        "GET",
        "/config",
        lambda d: _config_lines(d, history=False),
    )
    command(
        config,
        "history",
        "the config versions loaded since start, newest first",
        "GET",
        "/config",
        lambda d: _config_lines(d, history=True),
    )
    command(
        config,
        "reload",
        "re-read the config file, validate it, swap it in (as SIGHUP does)",
        "POST",
        "/config/reload",
        lambda d: "reloaded: " + _config_lines(d, history=False),
    )
    command(
        sub,
        "routes",
        "the running routes with their plugin chains, in run order",
        "GET",
        "/routes",
        _routes,
    )
    command(
        sub,
        "upstreams",
        "upstreams and their targets: connections, health, circuit breakers",
        "GET",
        "/upstreams",
        _upstreams,
    )
    command(
        sub,
        "cluster",
        "the live nodes of the server's cluster, with replica lag",
        "GET",
        "/cluster",
        _cluster,
    )
    command(
        sub,
        "health",
        "the server's liveness (and, in a cluster, its replica lag)",
        "GET",
        "/health",
        lambda d: f"{d['status']} (triogate {d['version']})",
    )

    def metrics(args: argparse.Namespace) -> int:
        return _guarded(lambda: print(call(args, "GET", "/metrics").text, end=""))

    p = sub.add_parser(
        "metrics", help="the server's Prometheus metrics, as scraped from GET /metrics"
    )
    _options(p)
    p.set_defaults(func=metrics)
