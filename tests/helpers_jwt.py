"""Keys, tokens (good and hostile) and a JWKS server on 127.0.0.1 for the
jwt tests."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from triogate.testing import FakeResponse, FakeUpstream, RecordedRequest

__all__ = [
    "HS_SECRET",
    "JwksServer",
    "b64",
    "ec_key",
    "hs_signed",
    "jwk_of",
    "make_token",
    "pem_of",
    "rsa_key",
    "unsigned",
]

HS_SECRET = "an-hmac-secret-of-at-least-32-bytes!!"


@functools.cache
def rsa_key(n: int = 0) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def ec_key(n: int = 0) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem_of(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def jwk_of(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    algorithm = jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else None
    doc = json.loads(
        algorithm.to_jwk(key.public_key())
        if algorithm is not None
        else jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())
    )
    doc["kid"] = kid
    return dict(doc)


def make_token(
    key: Any, alg: str, *, kid: str | None = None, now: float | None = None, **claims: Any
) -> str:
    """A token signed with ``key``; claims default to sub=alice, an hour's exp."""
    now = time.time() if now is None else now
    payload = {"sub": "alice", "exp": int(now) + 3600, **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _parts(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"


def hs_signed(secret: bytes, payload: dict[str, Any], kid: str | None = None) -> str:
    """HS256 with any bytes as the secret, by hand (PyJWT refuses a PEM key
    as a secret): the algorithm-confusion attack's token."""
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signing_input = _parts(header, payload)
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def unsigned(payload: dict[str, Any], kid: str | None = None) -> str:
    """``alg: none``: no signature at all."""
    header: dict[str, Any] = {"alg": "none", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    return f"{_parts(header, payload)}."


class JwksServer(FakeUpstream):
    """A JWKS endpoint on 127.0.0.1 whose answer a test changes: ``keys``
    (the JWKs served), or ``answer`` (any scripted answer: garbage, a 503,
    a dropped connection) when set. ``fetches`` counts the GETs."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        super().__init__(handler=self._serve)
        self.keys = keys
        self.answer: FakeResponse | None = None

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/.well-known/jwks.json"

    @property
    def fetches(self) -> int:
        return len(self.requests)

    async def _serve(self, request: RecordedRequest) -> FakeResponse:
        if self.answer is not None:
            return self.answer
        return FakeResponse.json({"keys": self.keys})
