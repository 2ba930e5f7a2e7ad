"""The configuration file (TOML), decoded into frozen msgspec Structs.

Everything is validated at load: unknown keys, wrong types and out-of-range
values are errors with a path (``routes[2].upstream: ...``), and *every* error
is reported at once, not just the first. Cross-field rules that need the whole
document (a route naming an unknown upstream, duplicate route names) are
checked after decoding, with paths too.

Environment overrides: ``TRIOGATE_SERVER__PROXY_LISTEN=127.0.0.1:9000``; a
double underscore walks into a table; the value is read as a TOML value when
it parses as one (numbers, booleans, arrays), else as a string.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from triogate.config_admin import AdminConfig
from triogate.config_cluster import ClusterConfig
from triogate.config_tls import ServerTLSConfig, tls_checks
from triogate.config_websocket import WebSocketConfig
from triogate.errors import ConfigError, FieldError, ValidationError
from triogate.events_config import EventsConfig, EventType, WebhookConfig, webhook_checks
from triogate.validation import convert_all

__all__ = [
    "ApiVersionConfig",
    "ClusterConfig",
    "Config",
    "EventType",
    "EventsConfig",
    "HealthCheckConfig",
    "KeysConfig",
    "KeyspaceConfig",
    "LogConfig",
    "RateLimitConfig",
    "RouteConfig",
    "ServerConfig",
    "StorageConfig",
    "UpstreamConfig",
    "WebhookConfig",
    "load_config",
    "parse_config",
]

Listen = Annotated[
    str,
    Meta(
        pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$",
        description="host:port to listen on",
    ),
]
# Every number has both bounds: a timeout of 1e-300 s or a body cap of
# 10^30 bytes is a typo, not a setting, and is refused at load.
Seconds = Annotated[float, Meta(ge=0, le=86400)]
PositiveSeconds = Annotated[float, Meta(ge=0.001, le=86400)]
MAX_BODY_BYTES = 1 << 40  # 1 TiB
Identifier = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
TargetUrl = Annotated[
    str,
    Meta(
        pattern=r"^https?://[^/\s]+(/[^\s]*)?$",
        description="http(s)://host:port[/base path] (https: see ca_file and verify)",
    ),
]
HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
PluginConfigs = dict[str, dict[str, Any]]


class RateLimitConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """A rate limit as configured: ``[keys] default_rate_limit``, and the base
    of the ``rate-limit`` plugin's settings. ``policy.ratelimit.limit_from``
    turns it into the ``Limit`` decisions take."""

    limit: Annotated[int, Meta(ge=1, le=1_000_000_000, description="requests per period")]
    period_seconds: Annotated[
        float, Meta(ge=0.001, le=31_536_000, description="period length (a millisecond to a year)")
    ]
    algorithm: Annotated[
        Literal["gcra", "sliding_window"],
        Meta(description="gcra (exact, smooth) or sliding_window (counts per window)"),
    ] = "gcra"


class ServerConfig(Struct, frozen=True, forbid_unknown_fields=True):
    proxy_listen: Listen = "127.0.0.1:8000"
    admin_listen: Listen = "127.0.0.1:8001"
    data_dir: Annotated[str, Meta(min_length=1, description="LMDB and secrets live here")] = (
        "./triogate-data"
    )
    shutdown_grace_seconds: Annotated[
        Seconds, Meta(description="in-flight requests get this long on SIGTERM")
    ] = 10.0
    max_request_body_bytes: Annotated[
        int, Meta(ge=0, le=MAX_BODY_BYTES, description="413 above this")
    ] = 10_485_760
    max_header_bytes: Annotated[int, Meta(ge=1024, le=1_048_576, description="431 above this")] = (
        65_536
    )
    workers: Annotated[int, Meta(ge=1, le=64, description="proxy processes")] = 1
    proxy_server: Annotated[
        Literal["native", "hypercorn"],
        Meta(description="the proxy front door: native (httptools) or hypercorn (ASGI)"),
    ] = "native"
    header_timeout_seconds: Annotated[
        PositiveSeconds, Meta(description="a request's headers must arrive within this (408)")
    ] = 10.0
    idle_timeout_seconds: Annotated[
        PositiveSeconds, Meta(description="an idle keep-alive connection is closed after this")
    ] = 60.0
    body_timeout_seconds: Annotated[
        PositiveSeconds, Meta(description="longest wait for the next piece of a request body")
    ] = 30.0
    body_deadline_seconds: Annotated[
        PositiveSeconds,
        Meta(
            description="a whole request body must arrive within this of the request's head (408)"
        ),
    ] = 120.0
    max_connections: Annotated[
        int,
        Meta(
            ge=1,
            le=1_000_000,
            description="open proxy connections at most; newer ones are answered 503 and closed",
        ),
    ] = 10_000
    underscores_in_headers: Annotated[
        bool,
        Meta(description="forward request headers whose names contain '_' (dropped by default)"),
    ] = False
    allow_path_parameters: Annotated[
        bool,
        Meta(description="accept ';params' in path segments, routed without them (400 by default)"),
    ] = False
    tls: ServerTLSConfig | None = None  # [server.tls]: HTTPS on the native listener


# One underscore, at the end: no prefix can then start another one, and the
# data plane finds a key's prefix with one ``find("_")``.
KeyPrefix = Annotated[
    str, Meta(pattern=r"^[a-z][a-z0-9]{0,15}_$", description="API key prefix, e.g. tg_")
]
#: The keyspace ``[keys] prefix`` names; a ``[keyspaces.default]`` table is refused.
DEFAULT_KEYSPACE = "default"
#: Admin keys' prefix (``control.admins``): an API keyspace may not take it.
RESERVED_PREFIXES = frozenset({"tgadm_"})
MAX_KEYSPACES = 64
#: ``[keys] import_formats`` bounds (``control.keyformat.ImportFormats``).
MAX_IMPORT_FORMATS = 32
MAX_IMPORT_FORMAT_LENGTH = 512


class KeysConfig(Struct, frozen=True, forbid_unknown_fields=True):
    prefix: KeyPrefix = "tg_"
    default_rate_limit: RateLimitConfig | None = None
    import_formats: Annotated[
        list[Annotated[str, Meta(min_length=1, max_length=MAX_IMPORT_FORMAT_LENGTH)]],
        Meta(
            max_length=MAX_IMPORT_FORMATS,
            description="RE2 regexes: foreign keys matching one may be imported and used",
        ),
    ] = []


class KeyspaceConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """``[keyspaces.NAME]``: keys made in it start with ``prefix``."""

    prefix: Annotated[KeyPrefix, Meta(description="this keyspace's key prefix, e.g. test_")]


class StorageConfig(Struct, frozen=True, forbid_unknown_fields=True):
    map_size_mb: Annotated[int, Meta(ge=16, le=1_048_576, description="LMDB map size")] = 4096
    flush_interval_seconds: Annotated[
        float, Meta(ge=0.01, le=86400, description="how often actors flush usage")
    ] = 1.0
    actor_idle_seconds: Annotated[
        PositiveSeconds, Meta(description="an actor unused this long is flushed and evicted")
    ] = 300.0
    usage_retention_days: Annotated[
        int, Meta(ge=1, le=3660, description="usage history (hour and day buckets) kept this long")
    ] = 90
    usage_minute_retention_hours: Annotated[
        int,
        Meta(ge=1, le=2160, description="minute buckets of the usage history kept this long"),
    ] = 48


class HealthCheckConfig(Struct, frozen=True, forbid_unknown_fields=True):
    path: Annotated[str, Meta(pattern=r"^/", max_length=2048, description="GET this path")] = (
        "/health"
    )
    interval_seconds: Annotated[PositiveSeconds, Meta(description="between probes")] = 5.0
    timeout_seconds: Annotated[PositiveSeconds, Meta(description="a slower probe fails")] = 2.0
    healthy_threshold: Annotated[
        int, Meta(ge=1, le=100, description="good probes in a row to bring a target back")
    ] = 2
    unhealthy_threshold: Annotated[
        int, Meta(ge=1, le=100, description="failed probes in a row to take a target out")
    ] = 3
    healthy_statuses: Annotated[
        list[Annotated[int, Meta(ge=100, le=599)]],
        Meta(description="statuses that count as healthy (empty: below 400)"),
    ] = []


class UpstreamConfig(Struct, frozen=True, forbid_unknown_fields=True):
    targets: Annotated[list[TargetUrl], Meta(min_length=1, max_length=256)]
    balance: Literal["round_robin", "least_connections"] = "round_robin"
    connect_timeout_seconds: PositiveSeconds = 2.0
    read_timeout_seconds: PositiveSeconds = 30.0
    health_check: HealthCheckConfig | None = None
    ca_file: str | None = None  # https targets: CAs to trust instead of the system's
    verify: bool = True  # https targets: false checks no certificate (testing only)


class RouteConfig(Struct, frozen=True, forbid_unknown_fields=True):
    name: Identifier
    path: Annotated[str, Meta(pattern=r"^/", max_length=2048)]
    upstream: Identifier
    methods: Annotated[list[HttpMethod], Meta(description="empty: every method")] = []
    upstream_path: (
        Annotated[
            str,
            Meta(pattern=r"^/", max_length=2048, description="rewrite template, e.g. /users/{id}"),
        ]
        | None
    ) = None
    version: (
        Annotated[
            str,
            Meta(
                pattern=r"^[A-Za-z0-9._-]{1,32}$",
                description="API version of a route without {version} in its path (Accept-Version)",
            ),
        ]
        | None
    ) = None
    plugins: PluginConfigs = {}
    websocket: bool | WebSocketConfig = True  # docs/websockets.md


class ApiVersionConfig(Struct, frozen=True, forbid_unknown_fields=True):
    deprecated: bool = False
    sunset: Annotated[datetime, Meta(tz=True)] | None = None


class LogConfig(Struct, frozen=True, forbid_unknown_fields=True):
    level: Annotated[
        Literal["DEBUG", "INFO", "WARNING", "ERROR"],
        Meta(description="the application log's threshold"),
    ] = "INFO"
    format: Annotated[
        Literal["text", "json"],
        Meta(description="application log lines on stderr: text, or one JSON object per line"),
    ] = "text"
    access_log: Annotated[
        str | None,
        Meta(description='one JSON line per request: "-" for stdout, a file path, "" for none'),
    ] = "-"
    access_log_queue: Annotated[
        int,
        Meta(
            ge=1,
            le=10_000_000,
            description="access log lines waiting to be written; more are dropped (counted)",
        ),
    ] = 10_000

    @property
    def access_log_destination(self) -> str | None:
        """Where access log lines go; None when there is no access log
        (TOML has no null, so an empty string turns it off)."""
        return self.access_log or None


class Config(Struct, frozen=True, forbid_unknown_fields=True):
    server: ServerConfig = ServerConfig()
    keys: KeysConfig = KeysConfig()
    storage: StorageConfig = StorageConfig()
    log: LogConfig = LogConfig()
    plugins: PluginConfigs = {}
    upstreams: dict[str, UpstreamConfig] = {}
    routes: list[RouteConfig] = []
    api_versions: dict[str, ApiVersionConfig] = {}
    keyspaces: dict[str, KeyspaceConfig] = {}
    events: EventsConfig = EventsConfig()
    cluster: ClusterConfig = ClusterConfig()
    admin: AdminConfig = AdminConfig()

    @property
    def data_dir(self) -> Path:
        return Path(self.server.data_dir)

    @property
    def keyspace_prefixes(self) -> dict[str, str]:
        """Every keyspace's prefix by name, ``default`` (``[keys] prefix``)
        first. A new dict per call: read it once, not per request."""
        prefixes = {DEFAULT_KEYSPACE: self.keys.prefix}
        prefixes.update((name, ks.prefix) for name, ks in self.keyspaces.items())
        return prefixes


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        if not name.startswith("TRIOGATE_") or "__" not in name:
            continue
        path = [p.lower() for p in name[len("TRIOGATE_") :].split("__")]
        node: Any = raw
        for part in path[:-1]:
            if isinstance(node, list):  # an array of tables: its item number ``part``
                child = node[int(part)] if part.isdigit() and int(part) < len(node) else None
            else:
                child = node.setdefault(part, {})
            if not isinstance(child, dict | list):
                break
            node = child
        else:
            if not isinstance(node, dict):
                continue
            try:
                node[path[-1]] = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                node[path[-1]] = value


def _cross_checks(config: Config) -> list[FieldError]:
    errors: list[FieldError] = []
    if config.server.workers > 1 and config.server.proxy_listen.endswith(":0"):
        errors.append(
            FieldError(
                "server.workers",
                "several workers share one proxy port: proxy_listen needs a fixed port",
            )
        )
    seen: dict[str, int] = {}
    for i, route in enumerate(config.routes):
        if route.upstream not in config.upstreams:
            errors.append(
                FieldError(f"routes[{i}].upstream", f"unknown upstream {route.upstream!r}")
            )
        if route.name in seen:
            errors.append(
                FieldError(
                    f"routes[{i}].name",
                    f"duplicate route name {route.name!r} (also routes[{seen[route.name]}])",
                )
            )
        seen.setdefault(route.name, i)
    errors.extend(_keyspace_checks(config))
    errors.extend(_import_format_checks(config.keys.import_formats))
    errors.extend(webhook_checks(config.events))
    errors.extend(tls_checks(config))
    return errors


def _import_format_checks(patterns: list[str]) -> list[FieldError]:
    """Each import format must compile with RE2, the engine that matches it
    (``policy.userregex``, which this base module may not import)."""
    if not patterns:
        return []
    import re2  # type: ignore[import-untyped]  # google-re2 ships no type information

    options = re2.Options()
    options.log_errors = False  # the error is reported here, with its path
    errors: list[FieldError] = []
    for i, pattern in enumerate(patterns):
        try:
            re2.compile(pattern, options)
        except re2.error as exc:
            reason = exc.args[0] if exc.args else exc
            if isinstance(reason, bytes):
                reason = reason.decode("utf-8", "replace")
            errors.append(
                FieldError(f"keys.import_formats[{i}]", f"not a valid RE2 expression: {reason}")
            )
    return errors


_KEYSPACE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


def _keyspace_checks(config: Config) -> list[FieldError]:
    """Names are identifiers, ``default`` is ``[keys] prefix``'s, and no
    prefix equals or starts another (a key must name its keyspace alone)."""
    errors: list[FieldError] = []
    if len(config.keyspaces) > MAX_KEYSPACES:
        errors.append(FieldError("keyspaces", f"at most {MAX_KEYSPACES} keyspaces"))
        return errors
    owners = {config.keys.prefix: f"keyspace {DEFAULT_KEYSPACE!r} ([keys] prefix)"}
    for name, keyspace in config.keyspaces.items():
        path = f"keyspaces.{name}"
        if name == DEFAULT_KEYSPACE:
            errors.append(
                FieldError(path, "the keyspace 'default' is [keys] prefix: set the prefix there")
            )
            continue
        if not _KEYSPACE_NAME_RE.match(name):
            errors.append(
                FieldError(
                    path,
                    "a keyspace name is a letter then up to 63 letters, digits, '_' or '-'",
                )
            )
        prefix = keyspace.prefix
        if prefix in RESERVED_PREFIXES:
            errors.append(FieldError(f"{path}.prefix", f"{prefix!r} is the admin keys' prefix"))
            continue
        for other, owner in owners.items():
            if prefix == other:
                errors.append(
                    FieldError(f"{path}.prefix", f"{prefix!r} is already the prefix of {owner}")
                )
            elif prefix.startswith(other) or other.startswith(prefix):
                errors.append(
                    FieldError(
                        f"{path}.prefix",
                        f"{prefix!r} and the prefix {other!r} of {owner}: one starts the other",
                    )
                )
        owners.setdefault(prefix, f"keyspace {name!r}")
    return errors


def parse_config(
    raw: dict[str, Any], *, source: str = "<config>", environ: Mapping[str, str] | None = None
) -> Config:
    try:
        config = decode_config(raw, environ)
    except ValidationError as exc:
        raise ConfigError(exc.errors, source) from None
    errors = cross_checks(config)
    if errors:
        raise ConfigError(errors, source)
    return config


def decode_config(raw: dict[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """The environment overrides applied to ``raw`` (in place), then the
    typed decode: raises ``ValidationError`` with every field error. The
    checks across sections (``cross_checks``) are not made."""
    _apply_env(raw, os.environ if environ is None else environ)
    return convert_all(raw, Config)


def cross_checks(config: Config) -> list[FieldError]:
    """What a typed decode cannot see: references between sections."""
    return _cross_checks(config)


def load_config(path: Path | None, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read, validate and return the config; ``None`` means embedded defaults."""
    if path is None:
        return parse_config({}, source="<defaults>", environ=environ)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([FieldError("$", f"cannot read: {exc.strerror}")], str(path)) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([FieldError("$", f"invalid TOML: {exc}")], str(path)) from None
    return parse_config(raw, source=str(path), environ=environ)


def config_version(config: Config) -> str:
    """A short content hash: the same config always has the same version id."""
    return hashlib.sha256(msgspec.json.encode(config)).hexdigest()[:12]
