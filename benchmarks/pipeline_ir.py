"""Instructions per request of the pipeline alone: routing, the plugins, the
answer's headers, the log phases and the observers, without sockets.

``python -m benchmarks.pipeline_ir [--route nokey|limited ...] [--requests N]``

``python -m benchmarks instructions`` counts a whole server under callgrind,
so a change to the connection code (or anyone else's, in a shared tree)
moves its figure too. This counts only ``Pipeline.handle`` and
``Pipeline.finish`` on a real gateway (real LMDB, a real key with its own
limit and credits, ``hotpath``'s routes), the upstream call answered at once
with nginx's parsed answer: the plugin side of the hot path. Each route runs
twice under callgrind, with ``N`` requests and with none (after the same
warm-up), and the difference over ``N`` is the figure: start-up cancels out.
Steady to about half a percent run to run (the actors' flusher runs on a
timer). Needs ``apt-get install valgrind``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

from triogate.config import parse_config
from triogate.control.audit import Actor
from triogate.control.models import CreateKeyRequest
from triogate.http import Headers, Request, Response
from triogate.runtime.gateway import open_gateway
from triogate.storage import RateLimit
from triogate.storage.records import Credits

from . import hotpath

ROUTES = ("nokey", "limited")
WARMUP = 200
_COLLECTED = re.compile(r"Collected : (\d+)")


async def _loop(route: str, requests: int) -> None:
    with tempfile.TemporaryDirectory(prefix="triogate-pipeline-ir-") as tmp:
        config = parse_config(hotpath._config(Path(tmp)), environ={})
        async with open_gateway(config) as gw:
            created = await gw.keys.create(
                CreateKeyRequest(
                    name="bench",
                    owner="bench",
                    rate_limits=[RateLimit(name="burst", limit=hotpath.NEVER, period_seconds=1)],
                    credits=Credits(remaining=10**15),
                ),
                Actor("bench"),
            )
            pipeline = gw.pipeline

            async def send(*_: object, sink: object, tried: object) -> Response:
                sink.sent_upstream = True  # type: ignore[attr-defined]
                sink.upstream_seconds = 0.0001  # type: ignore[attr-defined]
                return hotpath._parsed_answer()

            pipeline.upstreams["nginx"].send = send  # type: ignore[method-assign,assignment]
            secret = created.key if route != "nokey" else None
            base = hotpath._parse(hotpath._request_bytes(f"/{route}/bench/item", secret))
            for _ in range(WARMUP + requests):
                request = Request(
                    method=base.method,
                    path=base.path,
                    query=base.query,
                    headers=Headers(list(base.headers.raw)),
                    body=base.body,
                    client_ip=base.client_ip,
                )
                ctx, response = await pipeline.handle(request)
                if pipeline.finish(ctx, response) is not None or response.status != 200:
                    raise SystemExit(f"unexpected answer {response.status} on {route}")


def _collected(route: str, requests: int) -> int:
    done = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-m",
            "benchmarks.pipeline_ir",
            "--loop",
            route,
            str(requests),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"callgrind run failed:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.pipeline_ir",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--route", action="append", choices=ROUTES)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--loop", nargs=2, metavar=("ROUTE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.loop:
        trio.run(_loop, args.loop[0], int(args.loop[1]))
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: apt-get install valgrind")
    for route in args.route or ROUTES:
        base = _collected(route, 0)
        total = _collected(route, args.requests)
        per = (total - base) / args.requests
        print(f"{route:8} {per:12,.0f} instructions/request (pipeline only)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
