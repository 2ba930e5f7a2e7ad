"""Verifying a JSON Web Token, sans-IO: the ``jwt`` plugin's decisions.

Algorithm confusion is refused by construction: every verification key is a
``VerifyKey`` bound to the algorithms of its own family (an HMAC secret to
``HS*``, an RSA public key to ``RS*``, a P-256 key to ``ES256``), fixed when
the key is configured or fetched. A token's header only *selects* a key (by
``kid``) and names an algorithm that must then be one the key is bound to:
it never decides what kind of key is used, so an HS256 token "signed" with
a known RSA public key as its secret meets the RSA key, bound to RS*, and is
refused. ``none`` is in no family, so ``alg: none`` is refused too.

The signature is checked by PyJWT's algorithm objects (the one algorithm
allowed); the claims here, against the caller's clock (``now``, wall seconds), so a
test can move it: ``exp`` and ``nbf`` with a leeway, the accepted issuers
and audiences, the required claims, the consumer claim.

``TokenCache`` keeps what a verification found, keyed by the token's bytes,
until the token expires: a client that reuses its token pays for the
signature once.
"""

from __future__ import annotations

import base64
import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import jwt
import msgspec
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from triogate.errors import InvalidToken, TokenExpired

__all__ = [
    "ALGORITHMS",
    "ClaimRules",
    "KeySet",
    "TokenCache",
    "UnknownKid",
    "Verified",
    "VerifyKey",
    "hmac_key",
    "jwk_key",
    "parse_jwks",
    "pem_key",
    "verify",
]

#: The families; a key is bound to (a subset of) one of them.
HMAC: Final = frozenset({"HS256", "HS384", "HS512"})
RSA: Final = frozenset({"RS256", "RS384", "RS512"})
_EC_BY_CURVE: Final = {"secp256r1": "ES256", "secp384r1": "ES384"}
_EC_BY_CRV: Final = {"P-256": "ES256", "P-384": "ES384"}
ALGORITHMS: Final = HMAC | RSA | frozenset(_EC_BY_CURVE.values())

#: HMAC secrets shorter than the hash are guessable (RFC 7518 3.2).
MIN_SECRET_BYTES: Final = 32
MIN_RSA_BITS: Final = 2048
MAX_SUBJECT_CHARS: Final = 256

_VERIFIERS: Final = {
    name: algorithm
    for name, algorithm in jwt.algorithms.get_default_algorithms().items()
    if name in ALGORITHMS
}
_BASE64URL: Final = re.compile(rb"^[A-Za-z0-9_-]+$")
_object_decoder = msgspec.json.Decoder(dict[str, Any])


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """A verification key bound to the algorithms it may verify."""

    kid: str | None
    algorithms: frozenset[str]
    #: bytes for an HMAC secret, a cryptography public key otherwise.
    key: Any


def hmac_key(kid: str | None, algorithm: str, secret: bytes) -> VerifyKey:
    """An inline HMAC secret (ValueError: not HS*, too short, or a PEM key)."""
    if algorithm not in HMAC:
        raise ValueError(f"a secret verifies HS256/HS384/HS512, not {algorithm}")
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"an HMAC secret needs at least {MIN_SECRET_BYTES} bytes")
    if b"-----BEGIN" in secret:
        raise ValueError("a PEM key is not an HMAC secret (use public_key with RS*/ES*)")
    return VerifyKey(kid, frozenset({algorithm}), secret)


def pem_key(kid: str | None, algorithm: str, pem: str) -> VerifyKey:
    """An inline PEM public key for ``algorithm`` (ValueError otherwise)."""
    try:
        key = load_pem_public_key(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError, TypeError) as exc:
        raise ValueError(f"public_key is not a PEM public key ({exc})") from None
    if algorithm in RSA:
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError(f"{algorithm} needs an RSA public key")
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"an RSA key needs at least {MIN_RSA_BITS} bits")
    elif algorithm in _EC_BY_CURVE.values():
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError(f"{algorithm} needs an EC public key")
        if _EC_BY_CURVE.get(key.curve.name) != algorithm:
            raise ValueError(f"{algorithm} needs a key on its own curve, not {key.curve.name}")
    else:
        raise ValueError(f"a public key verifies RS*/ES*, not {algorithm}")
    return VerifyKey(kid, frozenset({algorithm}), key)


def jwk_key(jwk: Mapping[str, Any], allowed: frozenset[str]) -> VerifyKey | None:
    """A JWKS entry as a key bound to its family (its ``alg`` if it names
    one), within ``allowed``; None for a key that cannot verify here: a
    symmetric one (a secret has no business in a published key set), an
    encryption key, an unknown type, curve or algorithm."""
    kty = jwk.get("kty")
    if kty not in ("RSA", "EC") or jwk.get("use", "sig") != "sig":
        return None
    alg = jwk.get("alg")
    if kty == "RSA":
        family = RSA
    else:
        named = _EC_BY_CRV.get(str(jwk.get("crv")))
        family = frozenset({named}) if named else frozenset()
    if alg is not None:
        family = family & {alg} if isinstance(alg, str) else frozenset()
    algorithms = family & allowed
    if not algorithms:
        return None
    try:
        parsed = jwt.PyJWK(dict(jwk), next(iter(sorted(algorithms))))
    except (jwt.PyJWTError, ValueError, TypeError, KeyError):
        return None
    if isinstance(parsed.key, rsa.RSAPublicKey) and parsed.key.key_size < MIN_RSA_BITS:
        return None
    if not isinstance(parsed.key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return None  # a private key published by mistake is not used
    kid = jwk.get("kid")
    return VerifyKey(kid if isinstance(kid, str) else None, algorithms, parsed.key)


class KeySet:
    """Keys by ``kid``, and those without one (tried by algorithm)."""

    __slots__ = ("anonymous", "by_kid", "version")

    def __init__(self, keys: Iterable[VerifyKey], version: int = 0) -> None:
        keys = list(keys)
        # A kid may name several keys (a JWKS publishing one RSA and one EC
        # key under one kid, or two during a rotation): the token's alg picks.
        by_kid: dict[str, tuple[VerifyKey, ...]] = {}
        for k in keys:
            if k.kid is not None:
                by_kid[k.kid] = (*by_kid.get(k.kid, ()), k)
        self.by_kid = by_kid
        self.anonymous = tuple(k for k in keys if k.kid is None)
        #: Changes when the keys do: cached verdicts of another version are stale.
        self.version = version

    def __len__(self) -> int:
        return sum(map(len, self.by_kid.values())) + len(self.anonymous)

    def __repr__(self) -> str:
        return f"<KeySet v{self.version} kids={sorted(self.by_kid)} +{len(self.anonymous)}>"


EMPTY: Final = KeySet(())


@dataclass(frozen=True, slots=True)
class ClaimRules:
    """What a route asks of a token's claims."""

    algorithms: frozenset[str]
    issuers: frozenset[str] = frozenset()  # empty: any (or none)
    audiences: frozenset[str] = frozenset()  # empty: a token with an aud is refused
    required: tuple[str, ...] = ("exp",)
    leeway: float = 0.0
    consumer_claim: str = "sub"


@dataclass(frozen=True, slots=True)
class Verified:
    subject: str
    issuer: str | None
    claims: Mapping[str, Any]
    #: Wall seconds from which the token is expired (inf: no ``exp``).
    expires: float

    @property
    def state_key(self) -> str:
        # Unambiguous whatever the issuer and the subject contain.
        return msgspec.json.encode([self.issuer, self.subject]).decode()


class UnknownKid:
    """The token names a ``kid`` no key set has (a JWKS refresh may know it);
    ``kid`` None: the token names none and no key without one verifies its
    algorithm (yet: reported only to a caller whose keys may still come)."""

    __slots__ = ("kid",)

    def __init__(self, kid: str | None) -> None:
        self.kid = kid

    def __repr__(self) -> str:
        return f"<unknown kid {self.kid!r}>"


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    if name not in claims:
        return None
    # Present means a number: "exp": null is not "no exp" (a token that
    # never expires), and a huge integer is refused, not an OverflowError.
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken(f"the token's {name!r} claim is not a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise InvalidToken(f"the token's {name!r} claim is not a number")
    return number


def _candidates(
    kid: Any, alg: str, keysets: Sequence[KeySet], refreshable: bool
) -> list[VerifyKey] | UnknownKid:
    if kid is not None:
        if not isinstance(kid, str):
            raise InvalidToken("the token's 'kid' is not a string")
        for keyset in keysets:
            named = keyset.by_kid.get(kid)
            if named is not None:
                found = [k for k in named if alg in k.algorithms]
                if not found:
                    bound = ", ".join(sorted(a for k in named for a in k.algorithms))
                    raise InvalidToken(f"key {kid!r} verifies {bound}, not {alg}")
                return found
        return UnknownKid(kid)
    found = [k for keyset in keysets for k in keyset.anonymous if alg in k.algorithms]
    if not found:
        if refreshable:
            return UnknownKid(None)
        raise InvalidToken(f"no key without a kid verifies {alg}")
    return found


def _json_object(segment: bytes, what: str) -> dict[str, Any]:
    try:
        return _object_decoder.decode(_segment(segment))
    except (msgspec.DecodeError, RecursionError):
        # RecursionError: JSON nested past msgspec's depth limit; the
        # header is read before any signature check, so anyone can send it.
        raise InvalidToken(f"the token's {what} not a JSON object") from None


def _segment(part: bytes) -> bytes:
    """One base64url segment (RFC 7515: no padding), strictly."""
    if not _BASE64URL.match(part):
        raise InvalidToken("the bearer token is not a JWT")
    try:
        return base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4))
    except ValueError:
        raise InvalidToken("the bearer token is not a JWT") from None


def verify(
    token: bytes,
    rules: ClaimRules,
    keysets: Sequence[KeySet],
    now: float,
    *,
    refreshable: bool = False,
) -> Verified | UnknownKid:
    """The token's verdict: ``Verified``, an ``UnknownKid`` (the caller may
    refresh its keys and ask again), or ``InvalidToken``/``TokenExpired``
    raised. ``refreshable``: the keys may still change (a JWKS), so a token
    without a kid that no key verifies is an ``UnknownKid`` too.

    The compact form is split and decoded here, strictly (PyJWT's own
    parsing checks every character in Python: most of a cold HS256
    verification); the signature is PyJWT's algorithm objects' check."""
    parts = token.split(b".")
    if len(parts) != 3:
        raise InvalidToken("the bearer token is not a JWT")
    header = _json_object(parts[0], "header is")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in rules.algorithms or alg not in _VERIFIERS:
        raise InvalidToken(f"the token's algorithm {alg!r} is not accepted here")
    if "crit" in header or header.get("b64", True) is not True:
        # Extensions this verifier does not implement must not be ignored.
        raise InvalidToken("the token's header asks for extensions not supported here")
    candidates = _candidates(header.get("kid"), alg, keysets, refreshable)
    if isinstance(candidates, UnknownKid):
        return candidates
    signing_input = parts[0] + b"." + parts[1]
    signature = _segment(parts[2])
    verifier = _VERIFIERS[alg]
    for key in candidates:
        try:
            if verifier.verify(signing_input, key.key, signature):
                break
        except (ValueError, TypeError):
            raise InvalidToken("the token's signature is malformed") from None
    else:
        raise InvalidToken("the token's signature does not verify")
    return _check_claims(_json_object(parts[1], "claims are"), rules, now)


def _check_claims(claims: dict[str, Any], rules: ClaimRules, now: float) -> Verified:
    for name in rules.required:
        if name not in claims:
            raise InvalidToken(f"the token lacks the required claim {name!r}")
    exp = _number(claims, "exp")
    if exp is not None and now >= exp + rules.leeway:
        raise TokenExpired("the token has expired")
    nbf = _number(claims, "nbf")
    if nbf is not None and now + rules.leeway < nbf:
        raise InvalidToken("the token is not valid yet (nbf)")
    issuer = claims.get("iss")
    if issuer is not None and not isinstance(issuer, str):
        raise InvalidToken("the token's 'iss' is not a string")
    if rules.issuers and issuer not in rules.issuers:
        raise InvalidToken("the token's issuer is not accepted here")
    if rules.audiences:
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(isinstance(a, str) and a in rules.audiences for a in auds):
            raise InvalidToken("the token is not for this audience")
    elif "aud" in claims:
        # RFC 7519 4.1.3: a token naming its audiences is refused by a
        # verifier that is none of them (here: names none), or a token
        # issued for another service would be good here too.
        raise InvalidToken("the token names an audience and this route accepts none")
    subject = claims.get(rules.consumer_claim)
    if not isinstance(subject, str) or not 0 < len(subject) <= MAX_SUBJECT_CHARS:
        raise InvalidToken(f"the token has no usable {rules.consumer_claim!r} claim")
    return Verified(subject, issuer, claims, math.inf if exp is None else exp + rules.leeway)


T = TypeVar("T")


class TokenCache(Generic[T]):
    """A bounded LRU of verified tokens: token bytes -> (value, expiry, key
    version). An entry is good until its token expires and while the keys
    it was verified with are the current ones."""

    __slots__ = ("_entries", "hits", "misses", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[bytes, tuple[T, float, int]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token: bytes, now: float, version: int) -> T | None:
        entry = self._entries.get(token)
        if entry is None:
            self.misses += 1
            return None
        value, expires, seen = entry
        if now >= expires or seen != version:
            del self._entries[token]
            self.misses += 1
            return None
        self._entries.move_to_end(token)
        self.hits += 1
        return value

    def put(self, token: bytes, value: T, expires: float, version: int) -> None:
        if self.size <= 0:
            return
        entries = self._entries
        entries[token] = (value, expires, version)
        entries.move_to_end(token)
        while len(entries) > self.size:
            entries.popitem(last=False)


MAX_JWKS_KEYS: Final = 100


class _Jwks(msgspec.Struct):
    keys: list[dict[str, Any]]


_decode = msgspec.json.Decoder(_Jwks)


def parse_jwks(body: bytes, allowed: frozenset[str]) -> tuple[list[VerifyKey], bytes]:
    """The usable signing keys of a JWKS document and a fingerprint of them
    (ValueError: not a JWKS, or no usable key in it)."""
    try:
        doc = _decode.decode(body)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a JWKS document ({exc})") from None
    except RecursionError:
        raise ValueError("not a JWKS document (nested too deep)") from None
    keys: list[VerifyKey] = []
    usable: list[bytes] = []
    for entry in doc.keys[:MAX_JWKS_KEYS]:
        key = jwk_key(entry, allowed)
        if key is not None:
            keys.append(key)
            usable.append(msgspec.json.encode(entry, order="sorted"))
    if not keys:
        raise ValueError("no usable signing key in it")
    return keys, b"\n".join(sorted(usable))
