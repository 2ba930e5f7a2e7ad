"""The README's "Run it for real" block works as pasted: the files it names
exist, the config it checks is valid, and the upstreams it starts are the
ones the example config proxies to. Then the same setup runs for real (on
free ports and a temp data directory, so the test never takes the README's
fixed ports): echo upstreams, `serve`, the README's admin and key requests,
and a proxied call answered by an echo server."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx

from tests.helpers_process import clean_env, free_ports, run_cli, serving

ROOT = Path(__file__).resolve().parent.parent


def _block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index("Run it for real")
    body = text[start:].split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in body.splitlines() if line.strip()]


def test_the_run_block_names_what_exists_and_matches_the_example() -> None:
    lines = _block()
    commands = [shlex.split(part) for line in lines for part in line.split("&") if part.strip()]
    echo_ports = {int(c[2]) for c in commands if c[1:2] == ["echo"]}
    configs = [c[-1] for c in commands if c[1] in ("check-config", "serve")]
    for c in commands:
        assert (ROOT / c[0]).parent.name == "bin" and c[0].startswith(".venv/"), c
    assert configs and all((ROOT / cfg).is_file() for cfg in configs), configs
    example = tomllib.loads((ROOT / configs[0]).read_text())
    targets = {t for u in example["upstreams"].values() for t in u["targets"]}
    ports = {int(re.sub(r".*:(\d+).*", r"\1", t)) for t in targets}
    assert ports == echo_ports, (ports, echo_ports)
    # The check line, verbatim, from the repository's root.
    checked = run_cli("check-config", configs[0], cwd=ROOT)
    assert checked.returncode == 0, checked.stderr
    assert "OK" in checked.stdout


def test_the_example_serves_through_the_echo_upstreams(tmp_path: Path) -> None:
    (configs,) = {line.split()[-1] for line in _block() if " serve " in line}
    a, b, proxy, admin = free_ports(4)
    text = (ROOT / configs).read_text()
    text = text.replace("127.0.0.1:9001", f"127.0.0.1:{a}").replace(
        "127.0.0.1:9002", f"127.0.0.1:{b}"
    )
    text = text.replace("127.0.0.1:8000", f"127.0.0.1:{proxy}").replace(
        "127.0.0.1:8001", f"127.0.0.1:{admin}"
    )
    text = text.replace('"./triogate-data"', json.dumps(str(tmp_path / "data")))
    config = tmp_path / "triogate.toml"
    config.write_text(text)
    echoes = [
        subprocess.Popen(
            [sys.executable, "-m", "triogate", "echo", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=clean_env(),
        )
        for port in (a, b)
    ]
    try:
        for echo in echoes:
            assert echo.stdout is not None
            assert "listening" in echo.stdout.readline().decode()
        with serving(config) as proc:
            with proc.client() as client:
                setup = client.post("/setup", json={"name": "me", "email": "me@example.com"})
                assert setup.status_code == 201, setup.text
                token = setup.json()["key"]
                made = client.post(
                    "/keys",
                    headers={"authorization": f"Bearer {token}"},
                    json={"name": "billing", "owner": "acme", "scopes": ["users:read"]},
                )
                assert made.status_code == 201, made.text
            r = httpx.get(
                f"{proc.proxy_url}/v1/users/42",
                headers={"authorization": f"Bearer {made.json()['key']}"},
                timeout=10,
            )
            assert r.status_code == 200, r.text
            assert r.json()["path"] == "/users/42"  # the echo upstream's answer
            assert proc.stop(signal.SIGTERM) == 0
    finally:
        for echo in echoes:
            echo.terminate()
            echo.wait(10)
