"""The jwt plugin's decisions without I/O: key binding (algorithm confusion
and ``alg: none`` refused by construction), the claims against a clock the
test holds, the verified-token cache, JWKS parsing, the plugin's settings,
and the rate-limit plugin's ``by = "consumer"``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from tests.helpers_jwt import (
    HS_SECRET,
    b64,
    ec_key,
    hs_signed,
    jwk_of,
    make_token,
    pem_of,
    rsa_key,
    unsigned,
)
from triogate.errors import InvalidToken, MissingToken, RateLimited, TokenExpired
from triogate.http import Body, Headers, Request
from triogate.plugins.contract import Context, Limit, PluginEnv, RouteView, Subject
from triogate.plugins.jwt_auth import Jwt, JwtConfig
from triogate.plugins.rate_limit import RateLimit, RouteLimitConfig
from triogate.policy.jwtverify import (
    ClaimRules,
    KeySet,
    TokenCache,
    UnknownKid,
    Verified,
    hmac_key,
    jwk_key,
    parse_jwks,
    pem_key,
    verify,
)

NOW = 1_800_000_000.0
ALL = frozenset({"HS256", "RS256", "ES256"})


def keys() -> KeySet:
    return KeySet(
        [
            pem_key("rs", "RS256", pem_of(rsa_key())),
            hmac_key("hs", "HS256", HS_SECRET.encode()),
            pem_key(None, "ES256", pem_of(ec_key())),
        ]
    )


def check(token: str, rules: ClaimRules | None = None, now: float = NOW) -> Verified:
    verdict = verify(token.encode(), rules or ClaimRules(algorithms=ALL), [keys()], now)
    assert isinstance(verdict, Verified), verdict
    return verdict


def refused(token: str, rules: ClaimRules | None = None, now: float = NOW) -> str:
    with pytest.raises(InvalidToken) as info:
        verify(token.encode(), rules or ClaimRules(algorithms=ALL), [keys()], now)
    assert info.value.code == "INVALID_TOKEN"
    return str(info.value.detail)


# ---- signatures and key binding --------------------------------------------------


def test_each_family_verifies_with_its_key() -> None:
    assert check(make_token(rsa_key(), "RS256", kid="rs", now=NOW)).subject == "alice"
    assert check(make_token(HS_SECRET, "HS256", kid="hs", now=NOW, sub="bob")).subject == "bob"
    assert check(make_token(ec_key(), "ES256", now=NOW, sub="carol")).subject == "carol"


def test_a_forged_signature_is_refused() -> None:
    other = make_token(rsa_key(1), "RS256", kid="rs", now=NOW)
    assert "signature" in refused(other)
    header, _, signature = make_token(HS_SECRET, "HS256", kid="hs", now=NOW).split(".")
    tampered = json.dumps({"sub": "admin", "exp": NOW + 60}).encode()
    assert refused(f"{header}.{b64(tampered)}.{signature}")


def test_alg_none_is_refused_even_naming_a_key() -> None:
    payload = {"sub": "eve", "exp": NOW + 60}
    assert "'none'" in refused(unsigned(payload))
    assert "'none'" in refused(unsigned(payload, kid="rs"))
    # Even where "none" is listed as accepted it belongs to no key's family.
    lax = ClaimRules(algorithms=ALL | {"none"})
    refused(unsigned(payload, kid="rs"), lax)
    refused(unsigned(payload), lax)


def test_rs_hs_confusion_is_refused() -> None:
    """An HS256 token "signed" with the RSA public key as its secret."""
    public = pem_of(rsa_key()).encode()
    payload = {"sub": "eve", "exp": NOW + 60}
    assert "verifies RS256, not HS256" in refused(hs_signed(public, payload, kid="rs"))
    # Without a kid it meets only HS keys without a kid: here none.
    assert "no key without a kid verifies HS256" in refused(hs_signed(public, payload))
    anonymous_hs = KeySet([hmac_key(None, "HS256", HS_SECRET.encode())])
    with pytest.raises(InvalidToken, match="signature"):
        verify(hs_signed(public, payload).encode(), ClaimRules(algorithms=ALL), [anonymous_hs], NOW)
    only_rsa = KeySet([pem_key(None, "RS256", pem_of(rsa_key()))])
    with pytest.raises(InvalidToken):
        verify(hs_signed(public, payload).encode(), ClaimRules(algorithms=ALL), [only_rsa], NOW)


def test_an_algorithm_not_configured_is_refused() -> None:
    token = make_token(rsa_key(), "RS256", kid="rs", now=NOW)
    assert "not accepted" in refused(token, ClaimRules(algorithms=frozenset({"ES256"})))


@pytest.mark.parametrize(
    "token", ["", "garbage", "a.b.c", "e30.e30.", "eyJhbGciOiJSUzI1NiJ9.!!!.x", "x" * 5000]
)
def test_garbage_is_invalid(token: str) -> None:
    refused(token or ".")


def test_an_unknown_kid_is_reported_not_refused() -> None:
    token = make_token(rsa_key(1), "RS256", kid="new", now=NOW)
    verdict = verify(token.encode(), ClaimRules(algorithms=ALL), [keys()], NOW)
    assert isinstance(verdict, UnknownKid) and verdict.kid == "new"


# ---- claims against the clock ------------------------------------------------------


def test_exp_with_leeway() -> None:
    token = make_token(rsa_key(), "RS256", kid="rs", now=NOW, exp=int(NOW) + 10)
    rules = ClaimRules(algorithms=ALL, leeway=5)
    assert check(token, rules, NOW + 14).expires == NOW + 15
    with pytest.raises(TokenExpired) as info:
        verify(token.encode(), rules, [keys()], NOW + 15)
    assert info.value.code == "TOKEN_EXPIRED"


def test_nbf_in_the_future() -> None:
    token = make_token(rsa_key(), "RS256", kid="rs", now=NOW, nbf=int(NOW) + 100)
    assert "nbf" in refused(token, ClaimRules(algorithms=ALL, leeway=5))
    assert check(token, ClaimRules(algorithms=ALL, leeway=5), NOW + 96)


def test_issuer_audience_required_and_consumer_claims() -> None:
    rules = ClaimRules(
        algorithms=ALL,
        issuers=frozenset({"https://idp"}),
        audiences=frozenset({"api"}),
        required=("exp", "jti"),
        consumer_claim="client_id",
    )
    good: dict[str, Any] = {"iss": "https://idp", "aud": ["x", "api"], "jti": "1", "client_id": "c"}
    verdict = check(make_token(HS_SECRET, "HS256", kid="hs", now=NOW, **good), rules)
    assert (verdict.subject, verdict.issuer) == ("c", "https://idp")
    for change, words in [
        ({"iss": "https://evil"}, "issuer"),
        ({"iss": None}, "issuer"),
        ({"aud": "other"}, "audience"),
        ({"aud": None}, "audience"),
        ({"jti": None}, "'jti'"),
        ({"client_id": None}, "'client_id'"),
        ({"client_id": 7}, "'client_id'"),
        ({"exp": "tomorrow"}, "not a number"),
    ]:
        token = make_token(HS_SECRET, "HS256", kid="hs", now=NOW, **{**good, **change})
        assert words in refused(token, rules), change


def test_exp_is_required_by_default() -> None:
    token = make_token(rsa_key(), "RS256", kid="rs", now=NOW, exp=None)
    assert "'exp'" in refused(token)
    assert check(token, ClaimRules(algorithms=ALL, required=())).expires == float("inf")


def test_state_key_tells_issuers_apart() -> None:
    a = Verified("42", "https://a", {}, 0.0).state_key
    assert a != Verified("42", "https://b", {}, 0.0).state_key
    assert a != Verified('42"', "https://a", {}, 0.0).state_key


# ---- keys -------------------------------------------------------------------------


def test_inline_keys_are_bound_to_their_family() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        hmac_key(None, "HS256", b"short")
    with pytest.raises(ValueError, match="PEM"):
        hmac_key(None, "HS256", pem_of(rsa_key()).encode())
    with pytest.raises(ValueError, match="RSA"):
        pem_key(None, "RS256", pem_of(ec_key()))
    with pytest.raises(ValueError, match="EC"):
        pem_key(None, "ES256", pem_of(rsa_key()))
    with pytest.raises(ValueError, match="not a PEM"):
        pem_key(None, "RS256", "-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----")
    with pytest.raises(ValueError, match="HS256"):
        pem_key(None, "HS256", pem_of(rsa_key()))


def test_jwks_entries_are_bound_and_filtered() -> None:
    allowed = frozenset({"RS256", "ES256"})
    rsa_jwk = jwk_key(jwk_of(rsa_key(), "r"), allowed)
    assert rsa_jwk is not None and rsa_jwk.algorithms == {"RS256"} and rsa_jwk.kid == "r"
    ec_jwk = jwk_key(jwk_of(ec_key(), "e"), allowed)
    assert ec_jwk is not None and ec_jwk.algorithms == {"ES256"}
    assert jwk_key({"kty": "oct", "k": "c2VjcmV0", "kid": "s"}, allowed | {"HS256"}) is None
    assert jwk_key({**jwk_of(rsa_key(), "r"), "alg": "HS256"}, allowed | {"HS256"}) is None
    assert jwk_key({**jwk_of(rsa_key(), "r"), "use": "enc"}, allowed) is None
    assert jwk_key({"kty": "RSA", "n": "!!", "e": "AQAB"}, allowed) is None
    assert jwk_key(jwk_of(rsa_key(), "r"), frozenset({"ES256"})) is None


def test_parse_jwks() -> None:
    body = json.dumps({"keys": [jwk_of(rsa_key(), "a"), {"kty": "oct", "k": "x"}]}).encode()
    keys, fingerprint = parse_jwks(body, frozenset({"RS256"}))
    assert [k.kid for k in keys] == ["a"]
    assert parse_jwks(body, frozenset({"RS256"}))[1] == fingerprint
    for bad in [b"<html>", b"{}", b'{"keys": 3}', b'{"keys": [{"kty": "oct"}]}', b"[]"]:
        with pytest.raises(ValueError):
            parse_jwks(bad, frozenset({"RS256"}))


# ---- the cache ------------------------------------------------------------------


def test_token_cache_expires_evicts_and_follows_key_versions() -> None:
    cache: TokenCache[str] = TokenCache(2)
    cache.put(b"a", "A", expires=100.0, version=1)
    assert cache.get(b"a", 99.0, 1) == "A"
    assert cache.get(b"a", 99.0, 2) is None  # the keys changed: verify again
    cache.put(b"a", "A", expires=100.0, version=1)
    assert cache.get(b"a", 100.0, 1) is None  # expired: gone
    cache.put(b"a", "A", 100.0, 1)
    cache.put(b"b", "B", 100.0, 1)
    assert cache.get(b"a", 0.0, 1) == "A"  # a is now the most recent
    cache.put(b"c", "C", 100.0, 1)
    assert len(cache) == 2 and cache.get(b"b", 0.0, 1) is None
    assert cache.get(b"a", 0.0, 1) == "A" and cache.get(b"c", 0.0, 1) == "C"
    off: TokenCache[str] = TokenCache(0)
    off.put(b"a", "A", 100.0, 1)
    assert len(off) == 0


# ---- the plugin, without a gateway --------------------------------------------------


async def _nothing() -> AsyncIterator[bytes]:
    if False:
        yield b""


def _ctx(headers: list[tuple[str, str]], client: str = "10.0.0.1") -> Context:
    request = Request(
        method="GET",
        path="/",
        query="",
        headers=Headers.of(headers),
        body=Body(_nothing(), 0),
        client_ip=client,
    )
    return Context(request, request_id="r", started_at=0.0)


def _plugin(clock: list[float], **config: Any) -> Jwt:
    settings = {
        "keys": [
            {"kid": "rs", "algorithm": "RS256", "public_key": pem_of(rsa_key())},
            {"kid": "hs", "algorithm": "HS256", "secret": HS_SECRET},
        ],
        **config,
    }
    env = PluginEnv(clock=lambda: clock[0])
    return Jwt(msgspec.convert(settings, JwtConfig), env)


def test_plugin_sets_the_subject_and_headers_and_caches() -> None:
    clock = [NOW]
    plugin = _plugin(clock)
    token = make_token(rsa_key(), "RS256", kid="rs", now=NOW, exp=int(NOW) + 60, iss="i")
    for _ in range(3):
        ctx = _ctx([("authorization", f"Bearer {token}"), ("x-token-subject", "forged")])
        assert plugin.access_nowait(ctx) is None
        assert ctx.subject is not None and ctx.subject.id == "alice"
        assert ctx.subject.issuer == "i"
        assert ctx.request.headers.get_all("x-token-subject") == ["alice"]
        assert ctx.request.headers.get("authorization") is None
    assert (plugin.cache.hits, plugin.cache.misses) == (2, 1)
    clock[0] = NOW + 65  # past exp + leeway (5): the cached entry is gone too
    with pytest.raises(TokenExpired):
        plugin.access_nowait(_ctx([("authorization", f"Bearer {token}")]))


def test_plugin_missing_token_and_odd_subjects() -> None:
    plugin = _plugin([NOW], hide_credentials=False)
    with pytest.raises(MissingToken) as info:
        plugin.access_nowait(_ctx([("x-api-key", "k")]))
    assert info.value.headers["WWW-Authenticate"] == 'Bearer realm="triogate"'
    with pytest.raises(MissingToken):
        plugin.access_nowait(_ctx([("authorization", "Basic abc")]))
    token = make_token(HS_SECRET, "HS256", kid="hs", now=NOW, sub="a\r\nx: y é")
    ctx = _ctx([("authorization", f"Bearer {token}")])
    plugin.access_nowait(ctx)
    assert ctx.request.headers.get("x-token-subject") == "a%0D%0Ax: y %C3%A9"
    assert ctx.request.headers.get("authorization") == f"Bearer {token}"


def test_plugin_with_inline_keys_refuses_an_unknown_kid_at_once() -> None:
    plugin = _plugin([NOW])
    token = make_token(rsa_key(1), "RS256", kid="nope", now=NOW)
    with pytest.raises(InvalidToken, match="nope"):
        plugin.access_nowait(_ctx([("authorization", f"Bearer {token}")]))


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"keys": []}, "keys, a jwks URL"),
        ({"keys": [{"algorithm": "HS256", "secret": "short"}]}, "32 bytes"),
        ({"keys": [{"algorithm": "HS256"}]}, "one of secret"),
        ({"keys": [{"algorithm": "HS256", "secret_env": "TRIOGATE_TEST_UNSET_VAR"}]}, "not set"),
        ({"keys": [{"algorithm": "RS256", "secret": HS_SECRET}]}, "public_key"),
        ({"keys": [{"algorithm": "ES256", "public_key": "nope"}]}, "PEM"),
        (
            {"jwks": {"url": "http://127.0.0.1:1/j", "algorithms": ["HS256"]}},
            r"RS\*/ES\* only",
        ),
        (
            {
                "keys": [
                    {"kid": "a", "algorithm": "HS256", "secret": HS_SECRET},
                    {"kid": "a", "algorithm": "HS384", "secret": HS_SECRET},
                ]
            },
            "same kid",
        ),
    ],
)
def test_plugin_settings_refused(settings: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Jwt(msgspec.convert(settings, JwtConfig), PluginEnv())


def test_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIOGATE_TEST_JWT_SECRET", HS_SECRET)
    settings = {"keys": [{"algorithm": "HS256", "secret_env": "TRIOGATE_TEST_JWT_SECRET"}]}
    plugin = Jwt(msgspec.convert(settings, JwtConfig), PluginEnv(clock=lambda: NOW))
    ctx = _ctx([("authorization", "Bearer " + make_token(HS_SECRET, "HS256", now=NOW))])
    plugin.access_nowait(ctx)
    assert ctx.subject is not None


# ---- rate-limit by consumer ------------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.subjects: list[tuple[str, bool]] = []

    def admit_key_nowait(self, ctx: Context, consumer: Any, cost: int) -> None:
        return None

    def admit_nowait(
        self, ctx: Context, subject: str, limit: Limit, cost: int, *, key: bool
    ) -> None:
        self.subjects.append((subject, key))
        if len(self.subjects) > 99:
            raise RateLimited("x")

    def record_nowait(self, consumer: Any, status: int) -> None:
        return None


class _Key:
    id = name = "key_1"
    scopes: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    state_key = "key_0"


def test_rate_limit_by_consumer_picks_subject_then_key_then_address() -> None:
    limiter = _Recorder()
    config = msgspec.convert({"limit": 5, "period_seconds": 60, "by": "consumer"}, RouteLimitConfig)
    plugin = RateLimit(config, PluginEnv(limiter=limiter))
    plugin.bind(RouteView("r", 0, "/", "u", None, None, None), None)  # type: ignore[arg-type]
    with_subject = _ctx([])
    with_subject.subject = Subject("alice", "i", '["i","alice"]', {})
    with_key = _ctx([])
    with_key.consumer = _Key()
    for ctx in (with_subject, with_key, _ctx([], client="10.9.9.9")):
        plugin.access_nowait(ctx)
    assert limiter.subjects == [
        ('sub:r:["i","alice"]', False),
        ("key_0", True),
        ("ip:r:10.9.9.9", False),
    ]
    # by = "key" is unchanged: a token's subject alone counts per address.
    by_key = RateLimit(
        msgspec.convert({"limit": 5, "period_seconds": 60}, RouteLimitConfig),
        PluginEnv(limiter=limiter),
    )
    by_key.access_nowait(with_subject)
    assert limiter.subjects[-1] == ("ip:-:10.0.0.1", False)


def test_the_benchmark_measures_each_algorithm() -> None:
    from triogate.benchmarks.jwt import measure

    results = measure(seconds=0.01)
    assert set(results) == {"RS256", "ES256", "HS256"}
    assert all(row["cold"] > 0 and row["cached"] > 0 for row in results.values())
