"""``triogate check-config`` reports every error of a file in one pass: type
errors, references between sections and every plugin's settings together,
each with the file name, in sentences (never a bare regular expression)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers_process import run_cli
from triogate.errors import ConfigError
from triogate.runtime.configcheck import check_document

BAD = """
[server]
proxy_listen = "127.0.0.1:18000"
shutdown_grace_seconds = -1

[upstreams.users]
targets = ["ftp://x"]

[upstreams.other]
targets = ["http://127.0.0.1:9"]

[[routes]]
name = "a"
path = "/a"
upstream = "missing"
[routes.plugins]
key-auth = { scopez = 1 }
nonexistent = {}

[[routes]]
name = "b"
path = "/b"
upstream = "other"
[routes.plugins]
rate-limit = { limit = "ten", period_seconds = 60 }
"""


def test_type_reference_and_plugin_errors_in_one_pass(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(BAD)
    res = run_cli("check-config", str(f))
    assert res.returncode == 1, res
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert all(line.startswith(f"{f}: ") for line in lines), lines
    got = [line.removeprefix(f"{f}: ") for line in lines]
    assert got[:2] == [
        "server.shutdown_grace_seconds: Expected `float` >= 0.0",
        "upstreams.users.targets[0]: must be an http:// or https:// URL with a host, "
        "e.g. http://10.0.0.5:8080",
    ]
    assert "routes[0].upstream: unknown upstream 'missing'" in got
    assert "routes[0].plugins.key-auth.scopez: unknown field" in got
    assert any(line.startswith("routes[0].plugins.nonexistent: unknown plugin") for line in got)
    assert any(line.startswith("routes[1].plugins.rate-limit.limit:") for line in got), got
    # Nothing reported twice, and no error that only setting a field aside caused
    # (the emptied `targets`, the upstream `users` it took along).
    assert len(got) == len(set(got))
    assert not any("upstreams.users.targets:" in line for line in got), got
    assert not any("unknown upstream 'users'" in line for line in got), got


def test_a_clean_document_decodes() -> None:
    doc = {
        "upstreams": {"u": {"targets": ["http://127.0.0.1:9"]}},
        "routes": [{"name": "r", "path": "/r", "upstream": "u"}],
    }
    config = check_document(doc, "x.toml", environ={})
    assert [r.name for r in config.routes] == ["r"]


def test_a_route_left_without_its_upstream_reports_the_cause_only() -> None:
    doc = {
        "upstreams": {"u": {"targets": []}},
        "routes": [{"name": "r", "path": "/r", "upstream": "u"}],
    }
    with pytest.raises(ConfigError) as info:
        check_document(doc, "x.toml", environ={})
    assert info.value.lines() == ["upstreams.u.targets: Expected `array` of length >= 1"]
