"""``triogate demo``: the gateway on a bundled config, in front of the bundled
echo upstream, with an admin and a demo key ready, and curl lines to paste.

One ``trio.run``: the echo upstream (``triogate.runtime.echo``, on a free port) and
the gateway (``Server``, with its signal handling) share one nursery. Once
both listen, the admin is bootstrapped through the admin service (``setup``
on a fresh data directory; on a re-run, when setup was done before, that
admin gets a new key, since an admin key is shown only once) and a new
demo key with a small rate limit is created. Ctrl-C or SIGTERM stops the
gateway the way ``serve`` stops; then the echo upstream goes; exit 0.
"""

from __future__ import annotations

import contextlib
import errno
import sys
import tomllib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from triogate.config import Config, parse_config
from triogate.control.audit import Actor
from triogate.control.models import CreateAdminRequest, CreateKeyRequest, SetupRequest
from triogate.errors import Conflict, NotFound
from triogate.runtime.echo import EchoUpstream
from triogate.runtime.gateway import Gateway
from triogate.storage import RateLimit

if TYPE_CHECKING:
    from triogate.runtime.server import ServerInfo

__all__ = ["DEFAULT_DATA_DIR", "DEMO_CONFIG", "demo_config", "main"]

DEFAULT_PROXY_PORT = 8000
DEFAULT_ADMIN_PORT = 8001
DEFAULT_DATA_DIR = "./triogate-demo-data"
DEMO_RATE_LIMIT = 5
DEMO_PERIOD_SECONDS = 60
DEMO_PATH = "/v1/echo/hello"
ADMIN_NAME = "demo admin"
ADMIN_EMAIL = "admin@example.com"

DEMO_CONFIG = """\
# The config `triogate demo` runs on (print it with `triogate demo --print-config`).
# --proxy-port, --admin-port and --data-dir override the [server] values, and
# the echo upstream's target is replaced by the bundled echo upstream's address.

[server]
proxy_listen = "127.0.0.1:8000"
admin_listen = "127.0.0.1:8001"
data_dir = "./triogate-demo-data"
shutdown_grace_seconds = 2

[keys]
prefix = "tg_"

[log]
access_log = ""                           # keep the terminal for the curl lines

[plugins]                                 # global: every route
request-id = {}                           # X-Request-ID on every response
cors = { allow_origins = ["*"] }

[upstreams.echo]
targets = ["http://127.0.0.1:9000"]       # the bundled echo upstream
read_timeout_seconds = 10

[[routes]]
name = "echo"
path = "/v1/echo/{rest:path}"
upstream = "echo"
upstream_path = "/{rest}"                 # /v1/echo/hello reaches the upstream as /hello
[routes.plugins]
key-auth = {}                             # the demo key carries its own limit: 5 per 60 s
"""


def demo_config(
    *,
    proxy_port: int = DEFAULT_PROXY_PORT,
    admin_port: int = DEFAULT_ADMIN_PORT,
    data_dir: str = DEFAULT_DATA_DIR,
    echo_url: str = "http://127.0.0.1:9000",
) -> Config:
    """``DEMO_CONFIG`` with the ports, data directory and echo upstream given.
    ``TRIOGATE_*`` environment overrides are not applied: the demo is the
    same for everyone."""
    raw: dict[str, Any] = tomllib.loads(DEMO_CONFIG)
    server = raw["server"]
    server["proxy_listen"] = f"127.0.0.1:{proxy_port}"
    server["admin_listen"] = f"127.0.0.1:{admin_port}"
    server["data_dir"] = data_dir
    raw["upstreams"]["echo"]["targets"] = [echo_url]
    return parse_config(raw, source="<demo config>", environ={})


@dataclass(frozen=True)
class Credentials:
    admin_id: str
    admin_key: str = field(repr=False)
    new_setup: bool  # True: this run did the one-time setup
    key_id: str
    key: str = field(repr=False)


async def bootstrap(gw: Gateway) -> Credentials:
    """An admin key (setup if no admin exists yet, else a new super_admin)
    and a new demo key with the demo rate limit."""
    admin_key = admin_id = ""
    new_setup = False
    if not gw.admins.is_set_up():
        try:
            result = await gw.admins.setup(
                SetupRequest(name=ADMIN_NAME, email=ADMIN_EMAIL), source_ip=None
            )
            admin_key, admin_id, new_setup = result.key, result.id, True
        except Conflict:  # set up meanwhile by someone else
            pass
    if not new_setup:
        # A re-run: the demo's own admin gets a new key (the first was shown
        # once and is gone) rather than another super_admin being minted.
        # Only an admin the demo made (its name and e-mail): on a data
        # directory an operator set up, their admin's key must keep working.
        reused = None
        setup_id = gw.admins.setup_admin_id()
        ours = [
            a.id
            for a in gw.admins.list().items
            if a.status == "active" and a.name == ADMIN_NAME and a.email == ADMIN_EMAIL
        ]
        for admin in sorted(ours, key=lambda i: i != setup_id):  # the setup admin first
            with contextlib.suppress(Conflict, NotFound):
                reused = await gw.admins.reissue(admin, Actor("demo"))
                break
        if reused is None:  # setup was done by someone else, or its admin revoked
            reused = await gw.admins.create(
                CreateAdminRequest(name=ADMIN_NAME, email=ADMIN_EMAIL, role="super_admin"),
                Actor("demo"),
            )
        admin_key, admin_id = reused.key, reused.id
    key = await gw.keys.create(
        CreateKeyRequest(
            name="demo key",
            owner="demo",
            rate_limits=[RateLimit("demo", DEMO_RATE_LIMIT, DEMO_PERIOD_SECONDS)],
            metadata={"created_by": "triogate demo"},
        ),
        Actor(admin_id),
    )
    return Credentials(admin_id, admin_key, new_setup, key.id, key.key)


def banner(info: ServerInfo, echo_url: str, creds: Credentials) -> str:
    proxy, admin = info.proxy_url, info.admin_url
    auth = f'-H "Authorization: Bearer {creds.key}"'
    admin_auth = f'-H "Authorization: Bearer {creds.admin_key}"'
    url = f"{proxy}{DEMO_PATH}"
    tries = DEMO_RATE_LIMIT + 2
    admin_note = (
        "setup done just now"
        if creds.new_setup
        else "setup was done on an earlier run: a new key for the same admin"
    )
    return f"""
==============================================================================
 triogate demo is running
   proxy  {proxy}   route /v1/echo/{{rest}} -> echo upstream {echo_url}
   admin  {admin}   (OpenAPI: {admin}/openapi.json)
   data   {info.data_dir}

 admin key ({admin_note}):
   {creds.admin_key}
 demo key ({creds.key_id}, rate limit {DEMO_RATE_LIMIT} requests per {DEMO_PERIOD_SECONDS} s):
   {creds.key}
 Both are shown once: keep them. Each run of the demo creates new ones.

 Paste these into another terminal:

 # 1. with the key: 200 and what the echo upstream received (no API key, but X-Key-ID)
curl -s "{url}?name=demo" {auth}

 # 2. past the key's rate limit: 200s, then 429 (curl -si shows RateLimit and Retry-After)
for i in $(seq 1 {tries}); do curl -s -o /dev/null -w "%{{http_code}}\\n" {url} {auth}; done

 # 3. without a key: 401, a problem+json body with "code": "MISSING_KEY"
curl -s {url}

 # 4. the admin API: list the keys
curl -s {admin}/keys {admin_auth}

 Ctrl-C stops the gateway and the echo upstream.
==============================================================================
"""


async def run_demo(
    proxy_port: int = DEFAULT_PROXY_PORT,
    admin_port: int = DEFAULT_ADMIN_PORT,
    data_dir: str = DEFAULT_DATA_DIR,
) -> None:
    from triogate.runtime.server import Server  # hypercorn and friends: only when the demo runs

    echo = EchoUpstream()
    async with trio.open_nursery() as nursery:
        echo_url = await nursery.start(echo.run)
        config = demo_config(
            proxy_port=proxy_port, admin_port=admin_port, data_dir=data_dir, echo_url=echo_url
        )
        # No source: the config is not a file, so SIGHUP has nothing to reload.
        server = Server(config, handle_signals=True)
        info = await nursery.start(server.run)
        assert server.gateway is not None
        creds = await bootstrap(server.gateway)
        print(banner(info, echo_url, creds), flush=True)
        await server.stopped.wait()
        nursery.cancel_scope.cancel()  # the echo upstream serves forever
    print("triogate demo: stopped", flush=True)


def _sole(exc: BaseException) -> BaseException | None:
    """The one exception inside nested single-member groups, else None."""
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


def main(
    *,
    proxy_port: int = DEFAULT_PROXY_PORT,
    admin_port: int = DEFAULT_ADMIN_PORT,
    data_dir: str = DEFAULT_DATA_DIR,
    print_config: bool = False,
) -> int:
    if print_config:
        print(DEMO_CONFIG, end="")
        return 0
    try:
        try:
            trio.run(run_demo, proxy_port, admin_port, data_dir)
        except BaseExceptionGroup as group:
            # Errors surface through the demo's nursery; the CLI reports the
            # gateway's own errors (config, secrets, ...) by type.
            sole = _sole(group)
            if sole is None:
                raise
            raise sole from None
    except KeyboardInterrupt:  # before the gateway handles signals, or a second Ctrl-C
        print("triogate demo: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"triogate demo: {exc}", file=sys.stderr)
        if exc.errno == errno.EADDRINUSE:
            print(
                f"triogate demo: ports {proxy_port} and {admin_port} must be free "
                "(--proxy-port, --admin-port)",
                file=sys.stderr,
            )
        return 1
    return 0
