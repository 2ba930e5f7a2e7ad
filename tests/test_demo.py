"""``triogate demo`` (CONTRACT §1): the real executable, and the curl lines it
prints executed for what they mean (with httpx) and, when curl is installed,
verbatim (``bash -c``)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from tests.helpers_process import ServeProcess, clean_env, free_ports, run_cli, triogate_command
from triogate.runtime.echo import EchoUpstream

BANNER_END = "Ctrl-C stops the gateway and the echo upstream."
LOOP_RE = re.compile(r"^for i in \$\(seq 1 (\d+)\); do (curl .+?); done$")
CURL = shutil.which("curl")
BASH = shutil.which("bash")


# ---- running the demo -------------------------------------------------------


@dataclass
class Demo:
    sp: ServeProcess
    proxy_url: str
    admin_url: str
    banner: list[str]

    def curl_lines(self) -> list[str]:
        return [
            line.strip()
            for line in self.banner
            if line.strip().startswith("curl ") or LOOP_RE.match(line.strip())
        ]


def _wait_for_banner(sp: ServeProcess, timeout: float = 20.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = list(sp.stdout_lines)
        if any(BANNER_END in line for line in lines):
            return lines
        if not sp.running:
            break
        time.sleep(0.05)
    sp.kill()
    raise AssertionError(
        f"no demo banner (rc={sp.proc.returncode})\nstdout: {sp.stdout_lines}\n"
        f"stderr:\n{sp.stderr()}"
    )


@contextmanager
def running_demo(data_dir: Path, tmp_path: Path) -> Iterator[Demo]:
    proxy_port, admin_port = free_ports(2)
    args = [
        *triogate_command(),
        "demo",
        "--proxy-port",
        str(proxy_port),
        "--admin-port",
        str(admin_port),
        "--data-dir",
        str(data_dir),
    ]
    stderr_path = tmp_path / f"demo-stderr-{time.monotonic_ns()}.log"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=clean_env(),
            cwd=tmp_path,
        )
    sp = ServeProcess(proc, stderr_path)
    try:
        banner = _wait_for_banner(sp)
        yield Demo(sp, f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{admin_port}", banner)
    finally:
        if sp.running:
            sp.kill()


def stop_with_sigint(demo: Demo) -> None:
    started = time.monotonic()
    rc = demo.sp.stop(signal.SIGINT, timeout=15)
    elapsed = time.monotonic() - started
    stderr = demo.sp.stderr()
    assert rc == 0, f"exit status {rc}\nstderr:\n{stderr}"
    assert elapsed < 8, f"took {elapsed:.1f}s to stop"
    assert "Traceback" not in stderr, stderr
    assert "triogate demo: stopped" in demo.sp.stdout_lines


# ---- the printed curl lines ---------------------------------------------------


@dataclass
class CurlCall:
    """What one printed curl line asks for."""

    line: str
    url: str
    method: str = "GET"
    headers: dict[str, str] = field(default_factory=dict)
    data: str | None = None
    repeat: int = 1  # a `for i in $(seq 1 N)` loop

    def send(self, client: httpx.Client) -> httpx.Response:
        return client.request(
            self.method,
            self.url,
            headers=self.headers,
            content=self.data.encode() if self.data is not None else None,
        )

    @property
    def has_key(self) -> bool:
        names = {k.lower() for k in self.headers}
        return "authorization" in names or "x-api-key" in names


_NO_ARG = {"-s", "-S", "-i", "-si", "-sS", "-v", "--silent", "--include"}
_ONE_ARG = {"-o", "-w", "-H", "-X", "-d", "--data", "--header", "--request", "--output"}


def parse_curl(line: str) -> CurlCall:
    m = LOOP_RE.match(line)
    repeat, command = (int(m.group(1)), m.group(2)) if m else (1, line)
    argv = shlex.split(command)
    assert argv[0] == "curl", line
    url: str | None = None
    call = CurlCall(line=line, url="", repeat=repeat)
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg in _NO_ARG:
            i += 1
            continue
        assert arg in _ONE_ARG or not arg.startswith("-"), f"unknown curl option {arg}: {line}"
        if arg.startswith("-"):
            value = argv[i + 1]
            if arg in ("-H", "--header"):
                name, _, hvalue = value.partition(":")
                call.headers[name.strip()] = hvalue.strip()
            elif arg in ("-X", "--request"):
                call.method = value
            elif arg in ("-d", "--data"):
                call.data = value
                if call.method == "GET":
                    call.method = "POST"
            i += 2
        else:
            assert url is None, f"two URLs: {line}"
            url = arg
            i += 1
    assert url is not None, line
    call.url = url
    return call


def classify(demo: Demo) -> dict[str, CurlCall]:
    calls: dict[str, CurlCall] = {}
    for line in demo.curl_lines():
        call = parse_curl(line)
        if call.repeat > 1:
            kind = "rate_limit"
        elif call.url.startswith(demo.admin_url):
            kind = "admin"
        elif not call.has_key:
            kind = "no_key"
        else:
            kind = "success"
        assert kind not in calls, f"two {kind} lines: {calls[kind].line} / {line}"
        assert call.url.startswith((demo.proxy_url, demo.admin_url)), line
        calls[kind] = call
    assert set(calls) == {"success", "rate_limit", "no_key", "admin"}, demo.banner
    return calls


def bearer(call: CurlCall) -> str:
    return call.headers["Authorization"].removeprefix("Bearer ")


def bash(line: str) -> str:
    assert BASH is not None
    done = subprocess.run(
        [BASH, "-c", line], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0, (line, done.stdout, done.stderr)
    return done.stdout


# ---- the checks --------------------------------------------------------------


def check_success(call: CurlCall, body: dict[str, Any], text: str) -> None:
    key = bearer(call)
    assert key.startswith("tg_")
    assert body["method"] == call.method
    assert body["path"] == "/hello"  # /v1/echo/{rest} -> /{rest}
    assert body["query"] == urlsplit(call.url).query
    assert body["body_bytes"] == 0
    echoed = {k.lower() for k in body["headers"]}
    # The gateway strips the key and tells the upstream who called instead.
    assert "authorization" not in echoed and "x-api-key" not in echoed
    assert key not in text
    assert body["headers"]["x-key-id"].startswith("key_")
    assert "x-request-id" in echoed


def check_no_key(status: int, body: dict[str, Any]) -> None:
    assert status == 401
    assert body["code"] == "MISSING_KEY"
    assert body["status"] == 401


def exercise(demo: Demo, *, verbatim_loop: bool = False) -> dict[str, CurlCall]:
    calls = classify(demo)
    with httpx.Client(timeout=10) as client:
        success = calls["success"]
        r = success.send(client)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert r.headers.get("x-request-id")
        check_success(success, r.json(), r.text)
        if CURL and BASH:
            out = bash(success.line)
            check_success(success, json.loads(out), out)

        no_key = calls["no_key"]
        r = no_key.send(client)
        assert r.headers["content-type"].startswith("application/problem+json")
        check_no_key(r.status_code, r.json())
        if CURL and BASH:
            check_no_key(401, json.loads(bash(no_key.line)))

        admin = calls["admin"]
        assert bearer(admin).startswith("tgadm_")
        r = admin.send(client)
        assert r.status_code == 200, r.text
        starts = [item["start"] for item in r.json()["items"]]
        assert any(bearer(success).startswith(s) for s in starts), starts

        rate = calls["rate_limit"]
        assert bearer(rate) == bearer(success)
        if verbatim_loop and CURL and BASH:
            codes = bash(rate.line).split()
            assert len(codes) == rate.repeat, codes
            assert set(codes) <= {"200", "429"} and "429" in codes, codes
        statuses: list[int] = []
        first_429: httpx.Response | None = None
        for _ in range(rate.repeat):
            r = rate.send(client)
            statuses.append(r.status_code)
            if r.status_code == 429 and first_429 is None:
                first_429 = r
        assert first_429 is not None, statuses
        # Allowed until the limit, then refused: never a 200 after a 429.
        assert statuses == sorted(statuses), statuses
        assert set(statuses) <= {200, 429}, statuses
        assert int(first_429.headers["retry-after"]) >= 1
        assert first_429.json()["code"] == "RATE_LIMITED"
        assert first_429.headers["x-ratelimit-remaining"] == "0"
    return calls


# ---- tests ---------------------------------------------------------------------


def test_demo_prints_curl_lines_that_work_and_stops_on_sigint(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo-data"
    with running_demo(data_dir, tmp_path) as demo:
        text = "\n".join(demo.banner)
        assert "setup done just now" in text
        first = exercise(demo)
        stop_with_sigint(demo)
    assert (data_dir / "secrets").exists()

    # Again on the same data directory: setup is not repeated, but the demo
    # hands out a working admin key and a fresh demo key (fresh limit).
    with running_demo(data_dir, tmp_path) as demo:
        text = "\n".join(demo.banner)
        assert "setup was done on an earlier run" in text
        second = exercise(demo, verbatim_loop=True)
        assert bearer(second["success"]) != bearer(first["success"])
        assert bearer(second["admin"]) != bearer(first["admin"])
        # Both runs' demo keys are there.
        with httpx.Client(timeout=10) as client:
            r = second["admin"].send(client)
        assert sum(item["name"] == "demo key" for item in r.json()["items"]) == 2
        # The same admin with a new key, not a second super_admin; the first
        # run's admin key is refused now.
        with httpx.Client(base_url=demo.admin_url, timeout=10) as client:
            admins = client.get(
                "/admins", headers={"authorization": f"Bearer {bearer(second['admin'])}"}
            )
            assert admins.status_code == 200, admins.text
            assert len(admins.json()["items"]) == 1, admins.text
            old = client.get(
                "/admins", headers={"authorization": f"Bearer {bearer(first['admin'])}"}
            )
            assert old.status_code == 401, old.text
        stop_with_sigint(demo)


def test_demo_sigterm_exits_zero(tmp_path: Path) -> None:
    with running_demo(tmp_path / "d", tmp_path) as demo:
        rc = demo.sp.stop(signal.SIGTERM, timeout=15)
        assert rc == 0, demo.sp.stderr()


def test_demo_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        (admin_port,) = free_ports(1)
        done = run_cli(
            "demo",
            "--proxy-port",
            str(port),
            "--admin-port",
            str(admin_port),
            "--data-dir",
            str(tmp_path / "d"),
            cwd=tmp_path,
        )
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert f"ports {port} and {admin_port} must be free" in done.stderr


def test_demo_print_config_is_a_valid_config(tmp_path: Path) -> None:
    done = run_cli("demo", "--print-config")
    assert done.returncode == 0, done.stderr
    raw = tomllib.loads(done.stdout)
    assert raw["server"]["proxy_listen"] == "127.0.0.1:8000"
    assert raw["server"]["admin_listen"] == "127.0.0.1:8001"
    assert raw["server"]["data_dir"] == "./triogate-demo-data"
    assert "key-auth" in raw["routes"][0]["plugins"]
    assert set(raw["plugins"]) == {"request-id", "cors"}
    path = tmp_path / "demo.toml"
    path.write_text(done.stdout)
    checked = run_cli("check-config", str(path))
    assert checked.returncode == 0, checked.stderr


# ---- the echo upstream on its own -----------------------------------------------


async def test_echo_upstream_describes_the_request() -> None:
    echo = EchoUpstream()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(echo.run)
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            r = await client.post(
                "/a/b?x=1&y=2",
                content=b"hello",
                headers=[("x-twice", "1"), ("x-twice", "2")],
            )
            assert r.status_code == 200
            body = r.json()
            assert body["method"] == "POST"
            assert body["path"] == "/a/b"
            assert body["query"] == "x=1&y=2"
            assert body["body_bytes"] == 5
            assert body["headers"]["x-twice"] == "1, 2"
            head = await client.head("/")  # same connection, no body
            assert head.status_code == 200 and head.content == b""
            assert (await client.get("/again")).json()["path"] == "/again"
        assert echo.requests == 3
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("raw", [b"NOT HTTP\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n"])
async def test_echo_upstream_answers_400_to_a_bad_request(raw: bytes) -> None:
    echo = EchoUpstream()
    async with trio.open_nursery() as nursery:
        await nursery.start(echo.run)
        stream = await trio.open_tcp_stream("127.0.0.1", echo.port)
        async with stream:
            await stream.send_all(raw)
            data = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some(4096):
                    data += chunk
        # HTTP/1.1 without Host is a protocol error too.
        assert data.startswith(b"HTTP/1.1 400 "), data
        nursery.cancel_scope.cancel()
