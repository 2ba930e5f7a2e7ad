"""Review of the CLI, ``keys export``/``import`` and the reload path, as a
hostile operator: crafted export files (huge integers, deep nesting, a
device, a file that never ends), a stale file imported after a revocation,
an export next to a planted symlink, and ``serve --worker 0`` started by hand
(its parent must never get the supervisor's signal)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers_process import clean_env, free_ports, triogate_command
from tests.test_keyexport import (
    _exported,
    _set,
    cli,
    fresh_with_secrets_of,
    jok,
    ok,
    populate,
    tables,
)
from triogate.runtime import cli_keyexport


def _line_of(lines: list[str], kind: str) -> int:
    return next(i for i, line in enumerate(lines) if json.loads(line).get("type") == kind)


# ---- crafted files ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "path", "value", "field"),
    [
        # Stored as is, then one past it on the next change: msgpack overflow.
        ("plan", ("record", "version"), 2**64 - 1, "$.record.version"),
        ("key", ("record", "credits_version"), 2**63, "$.record.credits_version"),
        ("usage", ("record", "requests"), 2**64, "$.record.requests"),
        ("identity", ("record", "metadata", "n"), 10**30, "$.record"),
    ],
)
def test_a_huge_integer_is_refused_at_its_field(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kind: str,
    path: tuple[str, ...],
    value: int,
    field: str,
) -> None:
    file, lines = _exported(tmp_path, capsys)
    i = _line_of(lines, kind)
    lines[i] = _set(lines[i], path, value)
    file.write_text("\n".join(lines) + "\n")
    dst = tmp_path / "dst"
    rc, _, err = cli(capsys, "keys", "import", "--data-dir", str(dst), str(file))
    assert rc == 1
    assert f"VALIDATION_ERROR: line {i + 1}: {field}" in err, err
    # And the counter an import moves forwards never overflows afterwards.
    if kind == "plan":
        lines[i] = _set(lines[i], path, 2**53)
        file.write_text("\n".join(lines) + "\n")
        ok(capsys, "keys", "import", "--data-dir", str(dst), str(file))
        lines[i] = _set(lines[i], ("record", "name"), "silver")
        file.write_text("\n".join(lines) + "\n")
        assert "1 updated" in ok(capsys, "keys", "import", "--data-dir", str(dst), str(file))


def test_deep_nesting_is_refused_at_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file, lines = _exported(tmp_path, capsys)
    i = _line_of(lines, "identity")
    deep = "[" * 100_000 + "]" * 100_000
    lines[i] = lines[i].replace('"metadata":{', '"metadata":{"deep":' + deep + ",", 1)
    assert deep in lines[i]
    file.write_text("\n".join(lines) + "\n")
    rc, _, err = cli(capsys, "keys", "import", "--data-dir", str(tmp_path / "dst"), str(file))
    assert rc == 1 and f"line {i + 1}: $" in err and "nested too deeply" in err, err
    # A first line nested that deep is not an export file (nor a traceback).
    file.write_text(deep + "\n")
    rc, _, err = cli(capsys, "keys", "import", "--data-dir", str(tmp_path / "dst"), str(file))
    assert rc == 1 and "Traceback" not in err


def test_a_device_is_not_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A symlink to /dev/zero would be read until memory runs out."""
    link = tmp_path / "keys.jsonl"
    link.symlink_to("/dev/zero")
    rc, _, err = cli(capsys, "keys", "import", "--data-dir", str(tmp_path / "d"), str(link))
    assert rc == 1 and f"cannot read {link}: not a file" in err, err


def test_a_file_past_the_bound_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    file, _lines = _exported(tmp_path, capsys)
    monkeypatch.setattr(cli_keyexport, "MAX_FILE_BYTES", file.stat().st_size - 1)
    dst = tmp_path / "dst"
    rc, _, err = cli(capsys, "keys", "import", "--data-dir", str(dst), str(file))
    assert rc == 1 and "is larger than" in err and "nothing was imported" in err, err
    rc, _, err = cli(capsys, "keys", "import", "--data-dir", str(dst), "-", stdin=file.read_text())
    assert rc == 1 and "standard input is larger than" in err, err
    assert not (dst / "lmdb").exists()


def _through_fifo(fifo: Path, text: str) -> threading.Thread:
    def write() -> None:
        with open(fifo, "w") as f:  # blocks until the reader opens it
            f.write(text)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    return writer


def test_a_pipe_is_read_once_for_both_kinds_of_import(tmp_path: Path) -> None:
    """``keys import <(...)``: a pipe, read once. The item import used to
    open it a second time and wait for a writer that never came."""
    fifo = tmp_path / "items.fifo"
    os.mkfifo(fifo)
    writer = _through_fifo(
        fifo,
        json.dumps({"sha256": hashlib.sha256(b"x").hexdigest(), "name": "n", "owner": "o"}) + "\n",
    )
    data = tmp_path / "data"
    done = subprocess.run(
        [*triogate_command(), "keys", "import", "--data-dir", str(data), str(fifo), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
    )
    writer.join(5)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["migrated"]) == 1


# ---- a stale file imported again --------------------------------------------------


def test_a_reimport_never_revives_a_revoked_or_rotated_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    made = populate(capsys, src)
    file = tmp_path / "keys.jsonl"
    ok(capsys, "keys", "export", "--data-dir", str(src), str(file))
    dst = fresh_with_secrets_of(src, tmp_path / "dst")
    ok(capsys, "keys", "import", "--data-dir", str(dst), str(file))
    d = ("--data-dir", str(dst))
    ok(capsys, "keys", "revoke", *d, made["main"]["id"])
    rotated = jok(capsys, "keys", "rotate", *d, made["disabled"]["id"], "--grace-seconds", "0")
    before = tables(dst)
    out = ok(capsys, "keys", "import", *d, str(file))
    assert "0 created, 0 updated, 8 unchanged" in out, out
    assert tables(dst) == before
    rc, out, _ = cli(capsys, "keys", "validate", *d, stdin=made["main"]["key"] + "\n")
    assert rc != 0 and out.startswith("invalid: KEY_REVOKED"), out
    shown = jok(capsys, "keys", "get", *d, made["disabled"]["id"])
    assert shown["status"] == "rotated" and shown["rotated_to"] == rotated["new"]["id"]


# ---- export ----------------------------------------------------------------------


def test_an_export_never_writes_through_a_planted_symlink(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The temporary file had a name anyone could guess (``.FILE.PID.tmp``):
    a symlink planted there sent the digests to a file of the planter's."""
    src = tmp_path / "src"
    populate(capsys, src)
    out = tmp_path / "out"
    out.mkdir()
    bait = tmp_path / "bait"
    bait.write_text("")
    bait.chmod(0o644)
    (out / f".keys.jsonl.{os.getpid()}.tmp").symlink_to(bait)
    ok(capsys, "keys", "export", "--data-dir", str(src), str(out / "keys.jsonl"))
    assert bait.read_text() == ""
    written = out / "keys.jsonl"
    assert not written.is_symlink() and (written.stat().st_mode & 0o777) == 0o600
    assert json.loads(written.read_text().splitlines()[0])["format"] == "triogate.keys"


def test_an_export_that_cannot_be_written_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    populate(capsys, src)
    rc, _, err = cli(capsys, "keys", "export", "--data-dir", str(src), str(tmp_path / "no" / "x"))
    assert rc == 1 and f"cannot write {tmp_path / 'no' / 'x'}" in err, err
    rc, _, err = cli(capsys, "keys", "export", "--data-dir", str(src), str(tmp_path), "--force")
    assert rc == 1 and "cannot write" in err, err


# ---- serve --worker 0 by hand ------------------------------------------------------


def test_a_worker_started_by_hand_never_signals_its_parent(tmp_path: Path) -> None:
    """``POST /config/reload`` on worker 0 asks the supervisor (its parent)
    to reload the others with SIGUSR1. Started by hand, its parent is a
    shell, which SIGUSR1 kills."""
    (port,) = free_ports(1)
    config = tmp_path / "w.toml"
    config.write_text(
        f'[server]\nproxy_listen = "127.0.0.1:{port}"\nadmin_listen = "127.0.0.1:0"\n'
        f'data_dir = "{tmp_path / "data"}"\nworkers = 2\n'
    )
    serve = " ".join([*triogate_command(), "serve", "-c", str(config), "--worker", "0"])
    # A shell that runs the worker as a child (not exec) and reports after it.
    shell = subprocess.Popen(
        ["sh", "-c", f"{serve}; echo shell-survived"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=clean_env(),
        text=True,
    )
    try:
        assert shell.stdout is not None
        admin = None
        deadline = time.monotonic() + 60
        while admin is None and time.monotonic() < deadline:
            line = shell.stdout.readline()
            if "admin listening on" in line:
                admin = line.split()[-1]
        assert admin is not None, "the worker did not start"
        setup = httpx.post(f"{admin}/setup", json={"name": "ops", "email": "o@example.com"})
        token = setup.json()["key"]
        reload = httpx.post(
            f"{admin}/config/reload", headers={"authorization": f"Bearer {token}"}, timeout=10
        )
        assert reload.status_code == 200, reload.text
        # One more round trip: a signal sent during the reload has landed.
        assert httpx.get(f"{admin}/health", timeout=10).status_code < 500
        assert shell.poll() is None, "the shell died (SIGUSR1 from its child)"
        worker = subprocess.run(
            ["pgrep", "-P", str(shell.pid)], capture_output=True, text=True, timeout=10
        ).stdout.split()
        assert worker, "no worker under the shell"
        os.kill(int(worker[0]), signal.SIGTERM)
        out, _ = shell.communicate(timeout=60)
        assert "shell-survived" in out and shell.returncode == 0
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.wait(10)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))


# ---- check-config ----------------------------------------------------------------


def test_check_config_names_the_files_routes_after_one_is_set_aside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Setting aside ``routes[0]`` (its required ``upstream`` missing)
    shifted the later routes: ``routes[3]``'s error came back a second time
    as ``routes[2].path: required field is missing``."""
    from triogate.runtime.cli import main

    config = tmp_path / "c.toml"
    config.write_text(
        '[upstreams.echo]\ntargets = ["http://127.0.0.1:9001"]\n'
        '[[routes]]\nname = "a"\npath = "/a"\n'
        '[[routes]]\nname = "b"\npath = "/b"\nupstream = "echo"\n'
        '[[routes]]\nname = "c"\npath = "/c"\nupstream = "echo"\ntimeout_seconds = "x"\n'
        '[[routes]]\nname = "d"\npath = 5\nupstream = "echo"\n'
        '[[routes]]\nname = "e"\npath = "/e"\nupstream = "nope"\n'
    )
    assert main(["check-config", str(config)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert sorted(err) == sorted(
        [
            f"{config}: routes[0].upstream: required field is missing",
            f"{config}: routes[2].timeout_seconds: unknown field",
            f"{config}: routes[3].path: Expected `str`, got `int`",
            f"{config}: routes[4].upstream: unknown upstream 'nope'",
        ]
    ), err


# ---- the server commands against something that is not triogate -------------------


class _Garbage:
    """A TCP server answering every request with ``answer`` (or nothing)."""

    def __init__(self, answer: bytes | None) -> None:
        import socket

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.answer = answer
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(30)
        held = []
        try:
            for _ in range(20):  # bounded: a test makes a few requests
                conn, _addr = self.sock.accept()
                conn.recv(65536)
                if self.answer is None:
                    held.append(conn)  # never answers: the CLI times out
                    continue
                conn.sendall(self.answer)
                conn.close()
        except OSError:
            pass
        finally:
            for c in held:
                c.close()

    def close(self) -> None:
        self.sock.close()


def _ok_with(body: bytes, ctype: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: "
        + ctype
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\nconnection: close\r\n\r\n"
        + body
    )


@pytest.mark.parametrize(
    "answer",
    [
        _ok_with(b"<html>hello</html>", b"text/html"),
        _ok_with(b"[]"),
        _ok_with(b'{"items": 5}'),
        _ok_with(b'{"status": "ok"}'),
        b"HTTP/1.1 500 Internal\r\ncontent-length: 2\r\nconnection: close\r\n\r\n[]",
        b"not http at all\r\n\r\n",
    ],
)
@pytest.mark.parametrize("command", [["routes"], ["upstreams"], ["health"], ["config", "show"]])
def test_a_server_answering_garbage_is_one_line_not_a_traceback(
    capsys: pytest.CaptureFixture[str], answer: bytes, command: list[str]
) -> None:
    from triogate.runtime.cli import main

    server = _Garbage(answer)
    try:
        rc = main([*command, "--admin-url", server.url])
    finally:
        server.close()
    _, err = capsys.readouterr()
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert err.split(":")[0] in {"ADMIN_API_UNEXPECTED", "ADMIN_API_UNREACHABLE", "HTTP_500"}, err


def test_a_silent_server_and_a_bad_url_and_a_bad_key_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from triogate.runtime import cli_server
    from triogate.runtime.cli import main

    monkeypatch.setattr(cli_server, "TIMEOUT_SECONDS", 0.5)
    server = _Garbage(None)
    try:
        assert main(["health", "--admin-url", server.url]) == 1
    finally:
        server.close()
    err = capsys.readouterr().err
    assert err.startswith("ADMIN_API_UNREACHABLE: cannot reach"), err
    assert main(["health", "--admin-url", "http://["]) == 1
    assert capsys.readouterr().err.startswith("ADMIN_API_UNREACHABLE"), err
    keyfile = tmp_path / "key"
    keyfile.write_text("tg_clé\n")
    assert (
        main(["health", "--admin-url", "http://127.0.0.1:9", "--admin-key-file", str(keyfile)]) == 1
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err and "clé" not in err and len(err.splitlines()) == 1, err


# ---- the demo on a data directory an operator set up --------------------------------


def test_the_demo_never_reissues_an_operators_admin(tmp_path: Path) -> None:
    """The demo reissued the *setup* admin on a re-run: pointed at a data
    directory an operator set up (``--data-dir``), it made the operator's
    super_admin key stop working. Only the demo's own admin is reissued."""
    import trio

    from triogate.config import Config, ServerConfig
    from triogate.control.models import SetupRequest
    from triogate.runtime.demo import ADMIN_NAME, bootstrap
    from triogate.runtime.gateway import open_gateway

    config = Config(server=ServerConfig(data_dir=str(tmp_path / "data")))

    async def run() -> None:
        async with open_gateway(config) as gw:
            mine = await gw.admins.setup(
                SetupRequest(name="ops", email="ops@example.com"), source_ip=None
            )
            first = await bootstrap(gw)
            assert first.admin_id != mine.id
            assert gw.admins.authenticate(mine.key).id == mine.id
            second = await bootstrap(gw)
            assert second.admin_id == first.admin_id  # reused, not minted again
            assert gw.admins.authenticate(mine.key).id == mine.id
            names = [a.name for a in gw.admins.list().items if a.status == "active"]
            assert sorted(names) == sorted(["ops", ADMIN_NAME])

    trio.run(run)
