from pathlib import Path

import pytest

from triogate.config import Config, load_config, parse_config
from triogate.errors import ConfigError


def test_defaults() -> None:
    config = load_config(None, environ={})
    assert config.server.proxy_listen == "127.0.0.1:8000"
    assert config.server.admin_listen == "127.0.0.1:8001"
    assert config.data_dir == Path("./triogate-data")
    assert config.keys.prefix == "tg_"
    assert config.routes == []


def test_contract_example_loads(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        """
[server]
proxy_listen = "127.0.0.1:8000"
admin_listen = "127.0.0.1:8001"
data_dir = "./triogate-data"
shutdown_grace_seconds = 10
max_request_body_bytes = 10485760
max_header_bytes = 65536

[keys]
prefix = "tg_"
default_rate_limit = { limit = 100, period_seconds = 60 }

[plugins]
request-id = {}
cors = { allow_origins = ["*"] }

[upstreams.users]
targets = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
balance = "round_robin"
connect_timeout_seconds = 2.0
read_timeout_seconds = 30.0

[[routes]]
name = "users-read"
methods = ["GET"]
path = "/v{version:int}/users/{id:int}"
upstream = "users"
upstream_path = "/users/{id}"
[routes.plugins]
key-auth = { scopes = ["users:read"] }
rate-limit = { limit = 10, period_seconds = 1, by = "key" }

[api_versions."1"]
deprecated = true
sunset = 2027-06-30T00:00:00Z
"""
    )
    config = load_config(path, environ={})
    assert config.keys.default_rate_limit is not None
    assert config.keys.default_rate_limit.limit == 100
    assert config.upstreams["users"].targets[1] == "http://127.0.0.1:9002"
    assert config.routes[0].plugins["key-auth"] == {"scopes": ["users:read"]}
    assert config.api_versions["1"].deprecated


def errors(raw: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, environ={})
    return info.value.lines()


def test_every_error_has_a_path() -> None:
    lines = errors(
        {
            "server": {"proxy_listen": 5, "bogus": 1, "shutdown_grace_seconds": -1},
            "keys": {"prefix": "NO"},
            "upstreams": {"u": {"targets": []}},
            "routes": [{"name": "r", "path": "x", "upstream": "u"}],
            "nonsense": {},
        }
    )
    assert lines == [
        "nonsense: unknown field",
        "server.bogus: unknown field",
        "server.proxy_listen: Expected `str`, got `int`",
        "server.shutdown_grace_seconds: Expected `float` >= 0.0",
        "keys.prefix: must be a lowercase letter, up to 15 lowercase letters or digits, "
        "then '_' (e.g. tg_)",
        "upstreams.u.targets: Expected `array` of length >= 1",
        "routes[0].path: must be a path starting with '/'",
    ]


def test_cross_field_errors() -> None:
    lines = errors(
        {
            "upstreams": {"u": {"targets": ["http://127.0.0.1:9"]}},
            "routes": [
                {"name": "a", "path": "/a", "upstream": "u"},
                {"name": "b", "path": "/b", "upstream": "missing"},
                {"name": "a", "path": "/c", "upstream": "u"},
            ],
        }
    )
    assert lines == [
        "routes[1].upstream: unknown upstream 'missing'",
        "routes[2].name: duplicate route name 'a' (also routes[0])",
    ]


def test_environment_overrides() -> None:
    config = parse_config(
        {"server": {"admin_listen": "127.0.0.1:1"}},
        environ={
            "TRIOGATE_SERVER__ADMIN_LISTEN": "127.0.0.1:9001",
            "TRIOGATE_SERVER__SHUTDOWN_GRACE_SECONDS": "3",
            "TRIOGATE_KEYS__PREFIX": "acme_",
            "TRIOGATE_HMAC_SECRET": "not a config key",
        },
    )
    assert config.server.admin_listen == "127.0.0.1:9001"
    assert config.server.shutdown_grace_seconds == 3.0
    assert config.keys.prefix == "acme_"


def test_bad_environment_override_is_a_load_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({}, environ={"TRIOGATE_SERVER__WORKERS": "many"})
    assert info.value.lines() == ["server.workers: Expected `int`, got `str`"]


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.toml", environ={})
    assert info.value.errors[0].message.startswith("cannot read")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad, environ={})
    assert "invalid TOML" in info.value.errors[0].message


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.server = config.server  # type: ignore[misc]


def test_every_pattern_in_the_config_is_said_in_a_sentence() -> None:
    """No operator meets a bare regular expression: each ``pattern`` of the
    config's types has its sentence (``validation.PATTERN_SENTENCES``)."""
    import re
    from pathlib import Path

    import triogate.config
    from triogate.validation import PATTERN_SENTENCES

    core = Path(triogate.config.__file__ or "").parent
    modules = [*core.glob("config*.py"), core / "events_config.py"]
    assert len(modules) >= 3
    for module in modules:
        for pattern in re.findall(r'pattern=r"([^"]+)"', module.read_text()):
            assert pattern in PATTERN_SENTENCES, f"{module.name}: {pattern}"


def test_a_bad_upstream_target_is_a_sentence() -> None:
    lines = errors({"upstreams": {"u": {"targets": ["ftp://x"]}}})
    assert lines == [
        "upstreams.u.targets[0]: must be an http:// or https:// URL with a host, "
        "e.g. http://10.0.0.5:8080"
    ]
