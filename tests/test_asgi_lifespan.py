"""``hypercorn triogate.asgi:app`` on its own runs what ``triogate serve``
runs beside its listeners: the key actors (credits and usage reach LMDB,
with a final flush on SIGTERM), the access log, the health checks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from tests.helpers_process import clean_env, free_ports, run_cli
from tests.test_asgi_standalone import _wait
from triogate.config import load_config
from triogate.runtime.gateway import open_gateway

SPENT = 5
CREDITS = 10


def _usage(config: Path, key_id: str) -> tuple[int, int | None]:
    async def read() -> tuple[int, int | None]:
        async with open_gateway(load_config(config, environ={})) as gw:
            usage = gw.keys.usage(key_id)
            return usage.requests, usage.credits_remaining

    return trio.run(read)


def test_credits_and_usage_spent_under_plain_hypercorn_are_kept(tmp_path: Path) -> None:
    echo_port, port = free_ports(2)
    access_log = tmp_path / "access.log"
    config = tmp_path / "c.toml"
    config.write_text(
        f"""
[server]
data_dir = "{tmp_path / "data"}"
[storage]
flush_interval_seconds = 3600  # only the final flush can save the counts
[log]
access_log = "{access_log}"
[upstreams.echo]
targets = ["http://127.0.0.1:{echo_port}"]
[upstreams.echo.health_check]
path = "/health"
interval_seconds = 0.2
[[routes]]
name = "echo"
path = "/e/{{rest:path}}"
upstream = "echo"
upstream_path = "/{{rest}}"
[routes.plugins]
key-auth = {{}}
"""
    )
    made = run_cli(
        "keys", "create", "-c", str(config), "--json",
        "--name", "k", "--owner", "o", "--credits", str(CREDITS),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    echo = subprocess.Popen([sys.executable, "-m", "triogate.runtime.echo", str(echo_port)])
    hyper = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hypercorn",
            "--worker-class",
            "trio",
            "-b",
            f"127.0.0.1:{port}",
            "triogate.asgi:app",
        ],
        env=clean_env({"TRIOGATE_CONFIG": str(config)}),
        stderr=subprocess.PIPE,
    )
    try:
        _wait(f"http://127.0.0.1:{port}/nowhere")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for i in range(SPENT):
                r = client.get(f"/e/n{i}", headers={"Authorization": f"Bearer {key['key']}"})
                assert r.status_code == 200, r.text
            r = client.get("/e/x", headers={"Authorization": "Bearer tg_nope"})
            assert r.status_code == 401
        hyper.send_signal(signal.SIGTERM)
        assert hyper.wait(30) == 0
    finally:
        if hyper.poll() is None:
            hyper.kill()
            hyper.wait(10)
        echo.terminate()
        echo.wait(10)
    assert hyper.stderr is not None
    stderr = hyper.stderr.read().decode(errors="replace")
    assert "Traceback" not in stderr, stderr

    # The final flush wrote what the requests spent, before LMDB closed.
    assert _usage(config, key["id"]) == (SPENT, CREDITS - SPENT)
    shown = run_cli("keys", "get", key["id"], "-c", str(config), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["credits"]["remaining"] == CREDITS - SPENT
    # The access log writer ran: one line per answered request, drained on stop.
    lines = [json.loads(line) for line in access_log.read_text().splitlines()]
    # (_wait's one probe that got through was a 404.)
    assert [line.get("status") for line in lines] == [404] + [200] * SPENT + [401]


def test_a_damaged_data_directory_is_one_sentence_not_a_traceback(tmp_path: Path) -> None:
    """Start-up refused on purpose (here an emptied store) is logged as the
    refusal's one sentence; the gateway's own traceback is for bugs.
    (hypercorn then reports the failed lifespan in its own words.)"""
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n')
    made = run_cli("keys", "create", "-c", str(config), "--name", "k", "--owner", "o")
    assert made.returncode == 0, made.stderr
    (tmp_path / "data" / "lmdb" / "data.mdb").write_bytes(b"")
    hyper = subprocess.Popen(
        [
            sys.executable, "-m", "hypercorn", "--worker-class", "trio",
            "-b", f"127.0.0.1:{free_ports()[0]}", "triogate.asgi:app",
        ],
        env=clean_env({"TRIOGATE_CONFIG": str(config)}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = hyper.communicate(timeout=30)
    finally:
        if hyper.poll() is None:
            hyper.kill()
            hyper.wait(10)
    stderr = err.decode(errors="replace")
    assert "triogate failed to start: " in stderr, stderr
    assert "is now empty or missing: restore" in stderr, stderr
    # No frame of the gateway's own start-up: the sentence says it all.
    assert "open_data_dir" not in stderr and "datadir.py" not in stderr, stderr
