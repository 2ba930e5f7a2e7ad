"""Facts the docs state about the running code, kept true by tests: the data
directory's mode, what a request id looks like, that the built-in resilience
plugins ship. (Others are kept by their features' tests: the workers' reload
in test_workers_reload.py, check-config's plugin settings in
test_check_config_all.py.)"""

from __future__ import annotations

import re
import signal
import stat
from pathlib import Path

import httpx

from tests.helpers_process import run_cli, serving, write_config
from triogate.dataplane.plugin_loader import discover

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_data_directory_is_private_as_documented(tmp_path: Path) -> None:
    assert "Created if missing (mode 0700)" in (DOCS / "configuration.md").read_text()
    by_cli = tmp_path / "cli-data"
    made = run_cli(
        "keys", "create", "--data-dir", str(by_cli), "--name", "n", "--owner", "o", "--json"
    )
    assert made.returncode == 0, made.stderr
    assert _mode(by_cli) == 0o700
    assert _mode(by_cli / "secrets") == 0o600

    by_serve = tmp_path / "serve-data"
    with serving(write_config(tmp_path / "gw.toml", by_serve)) as proc:
        assert proc.stop(signal.SIGTERM) == 0
    assert _mode(by_serve) == 0o700
    assert _mode(by_serve / "secrets") == 0o600


def test_request_ids_are_what_the_docs_say(tmp_path: Path) -> None:
    text = (DOCS / "plugins.md").read_text()
    assert "32 hex digits, a random" in text
    with serving(write_config(tmp_path / "gw.toml", tmp_path / "data")) as proc:
        with httpx.Client(base_url=proc.proxy_url, timeout=10) as client:
            made = [client.get("/nowhere").json()["request_id"] for _ in range(3)]
            kept = client.get("/nowhere", headers={"x-request-id": "abc.DEF_1:2-3"})
        assert proc.stop(signal.SIGTERM) == 0
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in made), made
    assert len(set(made)) == 3
    # One process: one prefix, then a counter.
    assert len({rid[:16] for rid in made}) == 1
    assert kept.json()["request_id"] == "abc.DEF_1:2-3"


def test_the_resilience_plugins_ship_and_the_docs_do_not_say_otherwise() -> None:
    installed = set(discover())
    assert {"retry", "circuit-breaker", "rate-limit"} <= installed
    for page in DOCS.glob("*.md"):
        assert "not in this release" not in page.read_text(), page
