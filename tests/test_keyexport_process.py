"""Migration for real: keys made with the ``triogate`` executable in one data
directory, exported, imported into a fresh one (the same secrets), and then
served by a real ``triogate serve`` whose proxy lets exactly the right keys
through, with the balance they had; then an import next to that running
server, and a second import that changes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx

from tests.helpers_process import run_cli, serving, threaded_upstream
from tests.test_reload import config_doc, route, write_doc

JSON = dict[str, Any]


def cli_json(*args: str, stdin: str | None = None) -> Any:
    done = run_cli(*args, "--json") if stdin is None else _with_stdin(*args, "--json", stdin=stdin)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return json.loads(done.stdout)


def _with_stdin(*args: str, stdin: str) -> Any:
    import subprocess

    from tests.helpers_process import clean_env, triogate_command

    return subprocess.run(
        [*triogate_command(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
    )


def _get(proxy: httpx.Client, key: str) -> httpx.Response:
    return proxy.get("/api", headers={"Authorization": f"Bearer {key}"})


def test_exported_keys_work_through_the_proxy_of_a_fresh_data_dir(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    s = ("--data-dir", str(src))
    plan = cli_json("plans", "create", *s, "--name", "basic", "--scope", "api")
    live = cli_json(
        "keys",
        "create",
        *s,
        "--name",
        "live",
        "--owner",
        "alice",
        "--plan",
        plan["id"],
        "--credits",
        "3",
    )
    spent = cli_json("keys", "validate", *s, "--spend", "2", stdin=live["key"] + "\n")
    assert spent["valid"] is True and spent["credits_remaining"] == 1
    old = cli_json("keys", "create", *s, "--name", "old", "--owner", "bob", "--scope", "api")
    rotated = cli_json("keys", "rotate", *s, old["id"], "--grace-seconds", "3600")
    revoked = cli_json("keys", "create", *s, "--name", "gone", "--owner", "c", "--scope", "api")
    run_cli("keys", "revoke", *s, revoked["id"])
    off = cli_json(
        "keys", "create", *s, "--name", "off", "--owner", "d", "--scope", "api", "--disable"
    )

    file = tmp_path / "keys.jsonl"
    exported = run_cli("keys", "export", *s, str(file))
    assert exported.returncode == 0, exported.stderr
    dst.mkdir()
    shutil.copy(src / "secrets", dst / "secrets")
    imported = run_cli("keys", "import", "--data-dir", str(dst), str(file))
    assert imported.returncode == 0, imported.stderr
    assert "6 created, 0 updated, 0 unchanged" in imported.stdout

    with threaded_upstream() as upstream:
        cfg = write_doc(
            tmp_path / "gw.toml",
            config_doc(
                dst,
                {"a": upstream},
                [route("api", "/api", "a", plugins={"key-auth": {"scopes": ["api"]}})],
            ),
        )
        with serving(cfg) as sp, httpx.Client(base_url=sp.proxy_url, timeout=10) as proxy:
            assert _get(proxy, rotated["new"]["key"]).status_code == 200
            assert _get(proxy, old["key"]).status_code == 200  # in its grace
            r = _get(proxy, revoked["key"])
            assert r.status_code == 401 and r.json()["code"] == "KEY_REVOKED", r.text
            r = _get(proxy, off["key"])
            assert r.status_code == 403 and r.json()["code"] == "KEY_DISABLED", r.text
            assert _get(proxy, "tg_" + "x" * 40).status_code == 401
            # The plan's scope and the carried balance: one credit left.
            assert _get(proxy, live["key"]).status_code == 200
            r = _get(proxy, live["key"])
            assert r.status_code == 429 and r.json()["code"] == "QUOTA_EXCEEDED", r.text

            # Next to the running server: the same file again changes nothing.
            again = run_cli("keys", "import", "--data-dir", str(dst), str(file))
            assert again.returncode == 0, again.stderr
            assert "0 created, 0 updated, 6 unchanged" in again.stdout
            assert "nothing changed" in again.stdout
            assert _get(proxy, rotated["new"]["key"]).status_code == 200
