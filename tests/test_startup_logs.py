"""What ``triogate serve`` says when it starts: which version and config, the
data directory, how many routes; a loud warning when it has just generated
the secrets file that must be backed up, and when no route is configured."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.helpers_process import serving, write_config
from triogate import __version__


def test_first_start_warns_about_the_new_secrets_and_the_missing_routes(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "gw.toml", data_dir)
    with serving(config) as proc:
        assert proc.stop(signal.SIGTERM) == 0
        first = proc.stderr()
    assert f"triogate {__version__}: config {config} (version " in first
    assert f"data directory {data_dir}, 0 routes" in first
    assert "WARNING" in first and "no routes are configured" in first
    assert f"generated new secrets in {data_dir / 'secrets'}" in first
    assert "BACK THIS FILE UP" in first

    # A second start reuses the file: no warning about it.
    with serving(config) as proc:
        assert proc.stop(signal.SIGTERM) == 0
        second = proc.stderr()
    assert "generated new secrets" not in second
    assert "0 routes" in second


def test_a_config_with_routes_says_how_many(tmp_path: Path) -> None:
    config = write_config(tmp_path / "gw.toml", tmp_path / "data")
    config.write_text(
        config.read_text()
        + '\n[upstreams.u]\ntargets = ["http://127.0.0.1:9"]\n'
        + '\n[[routes]]\nname = "a"\npath = "/a"\nupstream = "u"\n'
        + '\n[[routes]]\nname = "b"\npath = "/b"\nupstream = "u"\n'
    )
    with serving(config) as proc:
        assert proc.stop(signal.SIGTERM) == 0
        text = proc.stderr()
    assert ", 2 routes" in text
    assert "no routes are configured" not in text
