"""JWT verifications per second: the ``jwt`` plugin's whole access decision
(find the bearer token, look it up in the verified-token cache, verify the
signature and claims on a miss, set ``ctx.subject``), in process, no HTTP.

*cold*: the cache is off (``cache_size = 0``), so every request verifies
its token's signature: what a client that never reuses a token costs.
*cached*: one token sent again and again, as a client reusing its token
until it expires does: the signature was verified once.

    python -m benchmarks jwt [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt as pyjwt
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from triogate.http import Body, Headers, Request
from triogate.plugins.contract import Context, PluginEnv
from triogate.plugins.jwt_auth import Jwt, JwtConfig

from .machine import describe

SECRET = "a-benchmark-hmac-secret-of-32-bytes-or-more"


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


async def _nothing() -> AsyncIterator[bytes]:
    if False:
        yield b""


def _context(token: str) -> Context:
    request = Request(
        method="GET",
        path="/",
        query="",
        headers=Headers.of([("host", "bench"), ("authorization", f"Bearer {token}")]),
        body=Body(_nothing(), 0),
        client_ip="127.0.0.1",
    )
    return Context(request, request_id="bench", started_at=0.0)


def _rate(plugin: Jwt, ctx: Context, seconds: float) -> float:
    """Access decisions per second, over about ``seconds``."""
    access = plugin.access_nowait
    done = 0
    batch = 100
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(batch):
            access(ctx)
        done += batch
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - started)


def measure(seconds: float = 1.0) -> dict[str, dict[str, float]]:
    """{algorithm: {"cold": per second, "cached": per second}}."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    keys: dict[str, tuple[Any, dict[str, str]]] = {
        "RS256": (rsa_key, {"public_key": _pem(rsa_key)}),
        "ES256": (ec_key, {"public_key": _pem(ec_key)}),
        "HS256": (SECRET, {"secret": SECRET}),
    }
    env = PluginEnv(clock=time.time)
    results: dict[str, dict[str, float]] = {}
    for alg, (signing, inline) in keys.items():
        token = pyjwt.encode(
            {"sub": "bench", "exp": int(time.time()) + 3600}, signing, alg, headers={"kid": "k"}
        )
        row: dict[str, float] = {}
        for label, cache_size in (("cold", 0), ("cached", 10_000)):
            settings = {
                "keys": [{"kid": "k", "algorithm": alg, **inline}],
                "cache_size": cache_size,
                "hide_credentials": False,  # the same request each time
                "subject_header": None,
            }
            plugin = Jwt(msgspec.convert(settings, JwtConfig), env)
            ctx = _context(token)
            plugin.access_nowait(ctx)  # warm up; the cached run pays its one miss here
            assert ctx.subject is not None and ctx.subject.id == "bench"
            row[label] = _rate(plugin, ctx, seconds)
        results[alg] = row
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks jwt", description=__doc__)
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    args = parser.parse_args(argv)
    print(describe("not pinned"))
    print(f"{'algorithm':<10} {'cold /s':>12} {'cached /s':>12} {'cold µs':>9} {'cached µs':>10}")
    for alg, row in measure(args.seconds).items():
        cold, cached = row["cold"], row["cached"]
        print(f"{alg:<10} {cold:>12,.0f} {cached:>12,.0f} {1e6 / cold:>9.1f} {1e6 / cached:>10.2f}")
    return 0
