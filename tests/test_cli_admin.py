"""The admin actions the CLI gained: on a real data directory (``keys usage``
and ``validate``, ``admin list`` and ``revoke``, ``audit list`` with its
filters, ``maintenance cleanup``, ``events``), and against a real running
``triogate serve`` through its admin API (``config show|history|reload``,
``routes``, ``upstreams``, ``cluster``, ``health``, ``metrics``), with its
permission checks and a server that is not there."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers_process import free_ports, serving, threaded_upstream
from tests.test_reload import config_doc, route, write_doc
from triogate.runtime.cli import main


def cli(
    capsys: pytest.CaptureFixture[str], *args: str, stdin: str | None = None
) -> tuple[int, str, str]:
    old = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        rc = main(list(args))
    finally:
        sys.stdin = old
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return rc, out, err


def ok(capsys: pytest.CaptureFixture[str], *args: str, stdin: str | None = None) -> str:
    rc, out, err = cli(capsys, *args, stdin=stdin)
    assert rc == 0, (args, out, err)
    return out


def jok(capsys: pytest.CaptureFixture[str], *args: str, stdin: str | None = None) -> Any:
    return json.loads(ok(capsys, *args, "--json", stdin=stdin))


# ---- on the data directory ---------------------------------------------------------


def test_keys_usage_and_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = ("--data-dir", str(tmp_path / "d"))
    key = jok(
        capsys,
        "keys",
        "create",
        *d,
        "--name",
        "n",
        "--owner",
        "o",
        "--scope",
        "read",
        "--credits",
        "5",
    )
    out = ok(capsys, "keys", "validate", *d, "--scope", "read", stdin=key["key"] + "\n")
    assert out.startswith(f"valid: {key['id']} owner='o'") and "credits_remaining=5" in out
    spent = jok(capsys, "keys", "validate", *d, "--spend", "2", stdin=key["key"])
    assert spent["credits_remaining"] == 3
    # The spend is stored: the next process sees it.
    usage = jok(capsys, "keys", "usage", *d, key["id"])
    assert usage["key_id"] == key["id"] and usage["credits_remaining"] == 3
    assert "credits_remaining=3" in ok(capsys, "keys", "usage", *d, key["id"])
    # Refused: exit status 1 and the code.
    rc, out, _ = cli(capsys, "keys", "validate", *d, "--scope", "write", stdin=key["key"])
    assert rc == 1 and out.startswith("invalid: ")
    rc, out, _ = cli(capsys, "keys", "validate", *d, stdin="tg_" + "x" * 40)
    assert rc == 1 and "INVALID_KEY" in out
    keyfile = tmp_path / "k"
    keyfile.write_text(key["key"] + "\n")
    assert ok(capsys, "keys", "validate", *d, "--key-file", str(keyfile)).startswith("valid")
    rc, _, err = cli(capsys, "keys", "validate", *d, stdin="")
    assert rc == 1 and "no key given" in err
    rc, _, err = cli(capsys, "keys", "usage", *d, "key_nope")
    assert rc == 1 and err.startswith(("VALIDATION_ERROR", "NOT_FOUND"))


def test_admin_list_and_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = ("--data-dir", str(tmp_path / "d"))
    a = jok(capsys, "admin", "create", *d, "--name", "Ann", "--email", "ann@example.com")
    b = jok(
        capsys,
        "admin",
        "create",
        *d,
        "--name",
        "Bob",
        "--email",
        "bob@example.com",
        "--role",
        "key_viewer",
    )
    listed = jok(capsys, "admin", "list", *d)
    assert [x["id"] for x in listed["items"]] == [b["id"], a["id"]]
    assert all("key" not in x for x in listed["items"])
    text = ok(capsys, "admin", "list", *d)
    assert "bob@example.com" in text and "role=key_viewer" in text
    revoked = jok(capsys, "admin", "revoke", *d, b["id"])
    assert revoked["status"] == "revoked"
    rc, _, err = cli(capsys, "admin", "revoke", *d, b["id"])
    assert rc == 1 and err.startswith("CONFLICT")
    # The contract's spelling, `admins`, is the same command.
    assert jok(capsys, "admins", "list", *d) == jok(capsys, "admin", "list", *d)


def test_audit_list_with_filters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = ("--data-dir", str(tmp_path / "d"))
    key = jok(capsys, "keys", "create", *d, "--name", "n", "--owner", "o")
    ok(capsys, "keys", "revoke", *d, key["id"])
    ok(capsys, "roles", "create", *d, "--name", "r")
    everything = jok(capsys, "audit", "list", *d)
    assert [e["action"] for e in everything["items"]] == ["role.create", "key.revoke", "key.create"]
    only = jok(capsys, "audit", "list", *d, "--action", "key.revoke")
    assert [e["target_id"] for e in only["items"]] == [key["id"]]
    assert jok(capsys, "audit", "list", *d, "--actor", "someone")["items"] == []
    page = jok(capsys, "audit", "list", *d, "--actor", "cli", "--limit", "2")
    assert len(page["items"]) == 2 and page["next_cursor"]
    rest = jok(capsys, "audit", "list", *d, "--limit", "2", "--cursor", page["next_cursor"])
    assert [e["action"] for e in rest["items"]] == ["key.create"]
    assert "key.revoke" in ok(capsys, "audit", "list", *d)
    rc, _, err = cli(capsys, "audit", "list", *d, "--limit", "1000")
    assert rc == 1 and err.startswith("VALIDATION_ERROR: limit")


def test_maintenance_cleanup_and_events(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = ("--data-dir", str(tmp_path / "d"))
    out = ok(capsys, "maintenance", "cleanup", *d)
    assert out.strip() == "expired 0 keys, purged 0 rotated keys"
    assert jok(capsys, "maintenance", "cleanup", *d) == {"expired": 0, "purged": 0}
    assert jok(capsys, "events", "list", *d) == {"items": [], "next_cursor": None}
    assert ok(capsys, "events", "list", *d, "--status", "failed").strip() == "no deliveries"
    rc, _, err = cli(capsys, "events", "get", *d, "nope")
    assert rc == 1 and err.startswith("VALIDATION_ERROR: id")
    rc, _, err = cli(capsys, "events", "retry", *d, "dlv_01M8ZZZZZZZZZZZZZZZZZZZZZZ")
    assert rc == 1 and err.startswith("NOT_FOUND")


# ---- against a running server -----------------------------------------------------


def test_server_commands_through_the_admin_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    with threaded_upstream() as upstream:
        doc = config_doc(data, {"a": upstream}, [route("one", "/one", "a")])
        cfg = write_doc(tmp_path / "gw.toml", doc)
        with serving(cfg) as sp:
            url = ("--admin-url", sp.url)
            # The CLI next to the running server, on its data directory.
            root = jok(
                capsys,
                "admin",
                "create",
                "--data-dir",
                str(data),
                "--name",
                "root",
                "--email",
                "root@example.com",
            )
            viewer = jok(
                capsys,
                "admin",
                "create",
                "--data-dir",
                str(data),
                "--name",
                "v",
                "--email",
                "v@example.com",
                "--role",
                "key_viewer",
            )

            rc, _, err = cli(capsys, "config", "show", *url)
            assert rc == 1 and err.startswith("MISSING_KEY") and "TRIOGATE_ADMIN_KEY" in err
            monkeypatch.setenv("TRIOGATE_ADMIN_KEY", root["key"])
            shown = jok(capsys, "config", "show", *url)
            assert shown["source"] == str(cfg) and shown["reloads"] == 0
            first = shown["version"]
            assert ok(capsys, "config", "show", *url).startswith(f"config {first} loaded ")

            doc["routes"].append(route("two", "/two", "a"))
            write_doc(cfg, doc)
            reloaded = jok(capsys, "config", "reload", *url)
            assert reloaded["version"] != first and reloaded["reloads"] == 1
            history = ok(capsys, "config", "history", *url)
            lines = history.splitlines()
            assert lines[1] == "history, newest first (* active):"
            assert lines[2].startswith(f"* {reloaded['version']}") and first in lines[3]

            routes = ok(capsys, "routes", *url)
            assert "one" in routes and "two" in routes and "/two" in routes
            ups = jok(capsys, "upstreams", *url)
            assert [u["name"] for u in ups["items"]] == ["a"]
            assert upstream.removeprefix("http://") in ok(capsys, "upstreams", *url)
            assert ok(capsys, "cluster", *url).strip() == "not in a cluster"
            assert ok(capsys, "health", *url).startswith("ok (triogate ")
            assert "# TYPE" in ok(capsys, "metrics", *url)

            # A key file instead of the environment; the API's permissions.
            keyfile = tmp_path / "viewer.key"
            keyfile.write_text(viewer["key"] + "\n")
            monkeypatch.delenv("TRIOGATE_ADMIN_KEY")
            rc, _, err = cli(capsys, "config", "reload", *url, "--admin-key-file", str(keyfile))
            assert rc == 1 and err.startswith("FORBIDDEN")
            # The config's admin listener is asked when no URL is given.
            monkeypatch.setenv("TRIOGATE_ADMIN_URL", sp.url)
            monkeypatch.setenv("TRIOGATE_ADMIN_KEY", root["key"])
            assert ok(capsys, "health").startswith("ok")


def test_a_server_that_is_not_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (port,) = free_ports(1)
    rc, _, err = cli(capsys, "config", "show", "--admin-url", f"http://127.0.0.1:{port}")
    assert rc == 1 and err.startswith("ADMIN_API_UNREACHABLE: cannot reach the admin API")
    monkeypatch.delenv("TRIOGATE_ADMIN_URL", raising=False)
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[server]\nadmin_listen = "0.0.0.0:{port}"\ndata_dir = "{tmp_path}"\n')
    rc, _, err = cli(capsys, "health", "-c", str(cfg))
    assert rc == 1 and f"http://127.0.0.1:{port}" in err  # a wildcard is asked on loopback
    cfg.write_text(f'[server]\nadmin_listen = "127.0.0.1:0"\ndata_dir = "{tmp_path}"\n')
    rc, _, err = cli(capsys, "health", "-c", str(cfg))
    assert rc == 1 and "give --admin-url" in err
