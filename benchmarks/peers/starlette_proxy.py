"""The usual FastAPI-style gateway: Starlette + httpx.AsyncClient on uvicorn
(uvloop, httptools, access log off). Run by the peers' venv
(benchmarks/setup.sh), not a module.

    python starlette_proxy.py --listen HOST:PORT --upstream HOST:PORT
"""

import argparse
import contextlib

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


def make_app(upstream: str) -> Starlette:
    client = httpx.AsyncClient(base_url=upstream, limits=httpx.Limits(max_connections=None))

    async def proxy(request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k not in HOP}
        answer = await client.request(
            request.method,
            request.url.path,
            params=request.url.query,
            headers=headers,
            content=await request.body(),
        )
        out = {k: v for k, v in answer.headers.items() if k.lower() not in HOP}
        return Response(answer.content, status_code=answer.status_code, headers=out)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{tail:path}", proxy, methods=methods)], lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    app = make_app(f"http://{args.upstream}")
    uvicorn.run(
        app,
        host=host,
        port=int(port),
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
