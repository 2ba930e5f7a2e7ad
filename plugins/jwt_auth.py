"""``jwt``: a JSON Web Token from ``Authorization: Bearer``, verified.

HS256/384/512, RS256/384/512 and ES256/384, with PyJWT over cryptography.
The keys are inline (an HMAC secret, or the name of the environment variable
holding it; a PEM public key) or a JWKS URL's, fetched off the request path
by the plugin's background task (``JwksCache``). Each key is bound to its own
algorithm family when it is configured or fetched; the token's ``alg`` only
has to be one of them (``triogate.policy.jwtverify``), so ``alg: none`` and
an HS256 token signed with a known RSA public key are refused by
construction.

A verified token's subject (the ``consumer_claim``, ``sub`` by default)
becomes ``ctx.subject``: a ``rate-limit`` with ``by = "consumer"`` counts
per subject, and the upstream gets it in ``subject_header``. What a
verification found is cached per token until the token expires, so a client
that reuses its token pays for the signature once.

Priority 1300: before key-auth (1250). On a route with both, both are
required: the token in ``Authorization: Bearer`` (removed before key-auth
looks, with ``hide_credentials``), the API key in ``X-API-Key``.
"""

from __future__ import annotations

import logging
import math
import os
import random
import weakref
from collections.abc import Awaitable
from types import MappingProxyType
from typing import Annotated, Final, Literal
from urllib.parse import quote

import httpx
import msgspec
import trio
from msgspec import Meta

from triogate.errors import InvalidToken, MissingToken
from triogate.plugins.contract import Context, Plugin, PluginEnv, Subject
from triogate.policy.jwtverify import (
    HMAC,
    ClaimRules,
    KeySet,
    TokenCache,
    UnknownKid,
    Verified,
    VerifyKey,
    hmac_key,
    parse_jwks,
    pem_key,
    verify,
)

__all__ = ["Jwt"]

_AUTHORIZATION = b"authorization"

log = logging.getLogger("triogate.plugins.jwt")

MAX_JWKS_BYTES: Final = 1 << 20
BACKOFF_FIRST_SECONDS: Final = 1.0

Algorithm = Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384"]
HeaderName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$")]
ClaimName = Annotated[str, Meta(min_length=1, max_length=128)]
EnvName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]


class JwtKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    algorithm: Annotated[
        Algorithm, Meta(description="the one algorithm this key verifies (its family is fixed)")
    ]
    kid: Annotated[
        str | None,
        Meta(description="the key id tokens name; none: tried for tokens without a kid"),
    ] = None
    secret: Annotated[
        str | None, Meta(description="HS*: the shared secret (at least 32 bytes)")
    ] = None
    secret_env: Annotated[
        EnvName | None, Meta(description="HS*: the environment variable that holds the secret")
    ] = None
    public_key: Annotated[str | None, Meta(description="RS*/ES*: the PEM public key")] = None


class JwksConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    url: Annotated[str, Meta(pattern=r"^https?://", max_length=2048, description="the JWKS URL")]
    refresh_seconds: Annotated[
        float, Meta(ge=1, le=86400, description="how often the key set is fetched again")
    ] = 300.0
    min_refresh_seconds: Annotated[
        float,
        Meta(ge=0.1, le=3600, description="an unknown kid fetches early at most this often"),
    ] = 10.0
    timeout_seconds: Annotated[
        float, Meta(gt=0, le=60, description="a fetch's timeout; an unknown kid waits as long")
    ] = 5.0
    algorithms: Annotated[
        list[Algorithm], Meta(min_length=1, description="algorithms the set's keys may verify")
    ] = msgspec.field(default_factory=lambda: ["RS256", "ES256"])


class JwtConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    keys: Annotated[list[JwtKey], Meta(max_length=100, description="inline verification keys")] = []
    jwks: Annotated[
        JwksConfig | None, Meta(description="a JWKS URL fetched off the request path")
    ] = None
    issuers: Annotated[
        list[str], Meta(max_length=100, description="accepted iss values (empty: any)")
    ] = []
    audiences: Annotated[
        list[str],
        Meta(
            max_length=100,
            description="the token's aud must name one (empty: a token with an aud is refused)",
        ),
    ] = []
    required_claims: Annotated[
        list[ClaimName], Meta(max_length=32, description="claims a token must have")
    ] = msgspec.field(default_factory=lambda: ["exp"])
    leeway_seconds: Annotated[
        float, Meta(ge=0, le=3600, description="clock skew allowed on exp and nbf")
    ] = 5.0
    consumer_claim: Annotated[
        ClaimName, Meta(description="the claim naming the consumer (ctx.subject)")
    ] = "sub"
    subject_header: Annotated[
        HeaderName | None,
        Meta(description="request header the upstream gets the subject in; none: not sent"),
    ] = "X-Token-Subject"
    hide_credentials: Annotated[
        bool, Meta(description="remove the Authorization header before the request goes on")
    ] = True
    cache_size: Annotated[
        int, Meta(ge=0, le=1_000_000, description="verified tokens remembered (0: none)")
    ] = 10_000


class JwksCache:
    """The last good key set of one JWKS URL, and the loop that keeps it.

    One per URL and config (the routes of a config that name the same JWKS
    share it). ``run`` is the plugin's background task, owned by the
    config's pipeline: it fetches at start and every ``refresh_seconds``;
    after a failure (the endpoint down, a status other than 200, garbage, a
    set without one usable key) again after a back-off that doubles from
    about a second up to the refresh interval. A failure keeps the keys it
    had. Requests only read ``keys``; a token naming a ``kid`` the set
    lacks may wake the loop for one early fetch (``refresh_soon``), at most
    every ``min_refresh_seconds`` however many ask: never one per request.
    """

    def __init__(
        self,
        url: str,
        *,
        refresh_seconds: float,
        min_refresh_seconds: float,
        timeout_seconds: float,
        algorithms: frozenset[str],
    ) -> None:
        self.url = url
        self.refresh_seconds = refresh_seconds
        self.min_refresh_seconds = min_refresh_seconds
        self.timeout_seconds = timeout_seconds
        self.algorithms = algorithms
        self.keys = KeySet((), version=0)
        self.fetches = 0
        self.failures = 0  # in a row
        self._fingerprint = b""
        self._running = False
        self._fetching = False
        self._last_attempt = -math.inf
        self._wake = trio.Event()
        self._done = trio.Event()  # set when the next fetch ends, then replaced
        self._source = (url, algorithms)
        if trio.lowlevel.in_trio_run():  # a reload's plugin (not `triogate check`)
            self._seed()

    def __repr__(self) -> str:
        return f"<JwksCache {self.url} {self.keys!r} failures={self.failures}>"

    def refresh_soon(self) -> trio.Event | None:
        """An unknown kid's ask: the event set when the next fetch ends, or
        None when the last one began under ``min_refresh_seconds`` ago (the
        kid waits for the scheduled refresh then)."""
        if self._fetching or self._last_attempt == -math.inf:
            return self._done  # one is on its way
        if trio.current_time() - self._last_attempt < self.min_refresh_seconds:
            return None
        self._wake.set()
        return self._done

    async def run(self) -> None:
        """Fetch now, then keep the set fresh, until cancelled. A second
        caller (another route's plugin sharing this cache) returns at once."""
        if self._running:
            return
        self._running = True
        self._seed()
        try:
            async with httpx.AsyncClient(
                timeout=self.timeout_seconds, follow_redirects=False, trust_env=False
            ) as client:
                while True:
                    delay = self.refresh_seconds
                    if not await self.fetch(client):
                        backoff = BACKOFF_FIRST_SECONDS * 2 ** min(self.failures - 1, 30)
                        delay = min(self.refresh_seconds, backoff) * random.uniform(0.5, 1.0)
                    with trio.move_on_after(delay):
                        await self._wake.wait()
                    self._wake = trio.Event()
        finally:
            self._running = False

    async def fetch(self, client: httpx.AsyncClient) -> bool:
        """One fetch; True if it gave a usable set (the keys are replaced
        only when they changed). Every waiter is released when it ends."""
        self._fetching = True
        self._last_attempt = trio.current_time()
        self.fetches += 1
        try:
            # httpx's timeout bounds each read, not the fetch: an endpoint
            # dripping its body would hold the loop (and every unknown-kid
            # request waiting on it) for as long as it liked.
            with trio.fail_after(self.timeout_seconds):
                body = await self._get(client)
            keys, fingerprint = parse_jwks(body, self.algorithms)
        except trio.TooSlowError:
            return self._failed(f"no answer within {self.timeout_seconds} s")
        except (httpx.HTTPError, ValueError) as exc:
            return self._failed(str(exc) or type(exc).__name__)
        except Exception as exc:
            # Anything else is a bug here or in a library, but ending the
            # loop would freeze the keys for good: logged, then retried.
            log.exception("JWKS %s: unexpected failure", self.url)
            return self._failed(type(exc).__name__)
        else:
            self.failures = 0
            if fingerprint != self._fingerprint:
                self._fingerprint = fingerprint
                self.keys = KeySet(keys, version=self.keys.version + 1)
                log.info("JWKS %s: %d signing key(s)", self.url, len(keys))
            _last_good().put(self._source, self.keys, fingerprint)
            return True
        finally:
            self._fetching = False
            done, self._done = self._done, trio.Event()
            done.set()

    def _failed(self, why: str) -> bool:
        self.failures += 1
        log.warning(
            "JWKS %s: %s; keeping the %d key(s) it had (failure %d in a row)",
            self.url,
            why,
            len(self.keys),
            self.failures,
        )
        return False

    def _seed(self) -> None:
        """Start from the keys this URL last gave (in this process, before a
        reload): a reload while the endpoint is down keeps them, as a
        failed refresh does."""
        if self.keys.version == 0 and not self._fingerprint:
            last = _last_good().get(self._source)
            if last is not None:
                self.keys, self._fingerprint = last

    async def _get(self, client: httpx.AsyncClient) -> bytes:
        async with client.stream("GET", self.url, headers={"accept": "application/json"}) as r:
            if r.status_code != 200:
                raise ValueError(f"answered {r.status_code}")
            body = bytearray()
            async for chunk in r.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
        return bytes(body)


def _inline_key(spec: JwtKey) -> VerifyKey:
    if spec.algorithm in HMAC:
        if spec.public_key is not None or (spec.secret is None) == (spec.secret_env is None):
            raise ValueError(f"{spec.algorithm} key: give one of secret and secret_env")
        secret = spec.secret
        if spec.secret_env is not None:
            secret = os.environ.get(spec.secret_env)
            if not secret:
                raise ValueError(f"environment variable {spec.secret_env} is not set")
        assert secret is not None
        return hmac_key(spec.kid, spec.algorithm, secret.encode("utf-8"))
    if spec.public_key is None or spec.secret is not None or spec.secret_env is not None:
        raise ValueError(f"{spec.algorithm} key: give public_key (and no secret)")
    return pem_key(spec.kid, spec.algorithm, spec.public_key)


class _LastGood:
    """The last good key set of each JWKS source, across reloads: one
    process's (a trio run's) memory, bounded."""

    MAX: Final = 64

    def __init__(self) -> None:
        self._sets: dict[tuple[str, frozenset[str]], tuple[KeySet, bytes]] = {}

    def get(self, source: tuple[str, frozenset[str]]) -> tuple[KeySet, bytes] | None:
        return self._sets.get(source)

    def put(self, source: tuple[str, frozenset[str]], keys: KeySet, fingerprint: bytes) -> None:
        self._sets.pop(source, None)
        self._sets[source] = (keys, fingerprint)
        while len(self._sets) > self.MAX:
            del self._sets[next(iter(self._sets))]


# A RunVar: a test's gateway (its own trio run) never sees another's keys.
_LAST_GOOD: Final[trio.lowlevel.RunVar[_LastGood]] = trio.lowlevel.RunVar("jwt_last_good")


def _last_good() -> _LastGood:
    try:
        return _LAST_GOOD.get()
    except LookupError:
        table = _LastGood()
        _LAST_GOOD.set(table)
        return table


# The key sets of one config, shared by its routes: one fetch loop per URL.
_SHARED: weakref.WeakKeyDictionary[PluginEnv, dict[tuple[object, ...], JwksCache]] = (
    weakref.WeakKeyDictionary()
)


def _check_url(url: str) -> None:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"jwks.url is not a URL ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError("jwks.url needs http:// or https:// and a host")


def _jwks_cache(env: PluginEnv, config: JwksConfig) -> JwksCache:
    _check_url(config.url)
    caches = _SHARED.setdefault(env, {})
    same = (*msgspec.structs.astuple(config)[:-1], tuple(config.algorithms))
    cache = caches.get(same)
    if cache is None:
        algorithms = frozenset(config.algorithms)
        if algorithms & HMAC:
            raise ValueError("jwks.algorithms: a published key set verifies RS*/ES* only")
        cache = caches[same] = JwksCache(
            config.url,
            refresh_seconds=config.refresh_seconds,
            min_refresh_seconds=config.min_refresh_seconds,
            timeout_seconds=config.timeout_seconds,
            algorithms=algorithms,
        )
    return cache


def _header_value(subject: str) -> bytes:
    # A subject is any string: percent-encoded, it is always a valid header.
    return quote(subject, safe="!#$&'()*+,/:;=?@[]~-._ ").encode("ascii")


class Jwt(Plugin[JwtConfig]):
    name = "jwt"
    priority = 1300
    Config = JwtConfig

    def __init__(self, config: JwtConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        if not config.keys and config.jwks is None:
            raise ValueError("give keys, a jwks URL, or both")
        keys = [_inline_key(k) for k in config.keys]
        kids = [k.kid for k in keys if k.kid is not None]
        if len(kids) != len(set(kids)):
            raise ValueError("two keys have the same kid")
        self.inline = KeySet(keys)
        self.jwks = None if config.jwks is None else _jwks_cache(env, config.jwks)
        algorithms = frozenset(a for k in keys for a in k.algorithms)
        if config.jwks is not None:
            algorithms |= frozenset(config.jwks.algorithms)
        self.rules = ClaimRules(
            algorithms=algorithms,
            issuers=frozenset(config.issuers),
            audiences=frozenset(config.audiences),
            required=tuple(config.required_claims),
            leeway=config.leeway_seconds,
            consumer_claim=config.consumer_claim,
        )
        self.cache: TokenCache[tuple[Subject, bytes]] = TokenCache(config.cache_size)
        self._clock = env.clock
        self._wait = config.jwks.timeout_seconds if config.jwks is not None else 0.0
        header = config.subject_header
        self._subject_header = header.lower().encode("latin-1") if header else None
        strip = {self._subject_header} if self._subject_header else set()
        if config.hide_credentials:
            strip.add(_AUTHORIZATION)
        self._strip = frozenset(strip)

    async def background(self) -> None:
        if self.jwks is not None:
            await self.jwks.run()

    def access_nowait(self, ctx: Context) -> Awaitable[None] | None:
        token = _bearer(ctx.request.headers.raw)
        if token is None:
            raise MissingToken("send the token as 'Authorization: Bearer <jwt>'")
        now = self._clock()
        jwks = self.jwks
        version = 0 if jwks is None else jwks.keys.version
        found = self.cache.get(token, now, version)
        if found is None:
            keysets = (self.inline,) if jwks is None else (self.inline, jwks.keys)
            verdict = verify(token, self.rules, keysets, now, refreshable=jwks is not None)
            if isinstance(verdict, UnknownKid):
                if jwks is None:
                    raise InvalidToken(f"no key has the token's kid {verdict.kid!r}")
                return self._after_refresh(ctx, token, jwks, verdict.kid)
            found = self._remember(token, verdict, version)
        self._accept(ctx, found)
        return None

    async def _after_refresh(
        self, ctx: Context, token: bytes, jwks: JwksCache, kid: str | None
    ) -> None:
        """A kid no key has: let the JWKS fetch early (rate-limited) and
        wait for it, then decide."""
        done = jwks.refresh_soon()
        if done is not None:
            with trio.move_on_after(self._wait):
                await done.wait()
        else:
            await trio.lowlevel.checkpoint()
        version = jwks.keys.version
        verdict = verify(token, self.rules, (self.inline, jwks.keys), self._clock())
        if isinstance(verdict, UnknownKid):  # a token without a kid raised already
            raise InvalidToken(f"no key has the token's kid {kid!r}")
        self._accept(ctx, self._remember(token, verdict, version))

    def _remember(self, token: bytes, verdict: Verified, version: int) -> tuple[Subject, bytes]:
        subject = Subject(
            id=verdict.subject,
            issuer=verdict.issuer,
            state_key=verdict.state_key,
            claims=MappingProxyType(verdict.claims),  # one dict for every cached use
        )
        found = (subject, _header_value(verdict.subject))
        self.cache.put(token, found, verdict.expires, version)
        return found

    def _accept(self, ctx: Context, found: tuple[Subject, bytes]) -> None:
        subject, value = found
        ctx.subject = subject
        headers = ctx.request.headers
        strip = self._strip
        if strip:
            headers.raw = [(k, v) for k, v in headers.raw if k not in strip]
        if self._subject_header is not None:
            headers.raw.append((self._subject_header, value))


def _bearer(raw: list[tuple[bytes, bytes]]) -> bytes | None:
    found: bytes | None = None
    seen = False
    for name, value in raw:
        if name == _AUTHORIZATION:
            if seen:
                # Not a list header (RFC 9110 11.6.2): with two, an upstream
                # reading the other would act on a token nobody verified.
                raise InvalidToken("send one Authorization header, not several")
            seen = True
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                found = token.strip()
    return found
