"""A hand-written reverse proxy on aiohttp + uvloop: what a Python team could
write in an afternoon. With ``--api-key`` it is a minimal DIY gateway: the
X-API-Key header looked up in a dict (401 without a known key) and a request
counter per key. Run by the peers' venv (benchmarks/setup.sh), not a module.

    python aiohttp_proxy.py --listen HOST:PORT --upstream HOST:PORT [--api-key KEY]
"""

import argparse
import collections

import aiohttp
import uvloop
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


def make_app(upstream: str, keys: dict[str, str]) -> web.Application:
    counts: collections.Counter[str] = collections.Counter()

    async def proxy(request: web.Request) -> web.Response:
        if keys:
            owner = keys.get(request.headers.get("X-API-Key", ""))
            if owner is None:
                return web.Response(status=401, text="unknown API key\n")
            counts[owner] += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        session: aiohttp.ClientSession = request.app["session"]
        async with session.request(
            request.method, upstream + request.path_qs, headers=headers, data=await request.read()
        ) as answer:
            body = await answer.read()
            out = {k: v for k, v in answer.headers.items() if k.lower() not in HOP}
            return web.Response(status=answer.status, body=body, headers=out)

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app["session"].close()

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--api-key", default="")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    keys = {args.api_key: "bench"} if args.api_key else {}
    app = make_app(f"http://{args.upstream}", keys)
    uvloop.install()
    web.run_app(app, host=host, port=int(port), access_log=None, print=None)


if __name__ == "__main__":
    main()
