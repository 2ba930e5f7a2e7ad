"""The access log on a real ``triogate serve``: admin API requests get their
line beside proxied ones (route ``admin``, the admin's id, never its key),
and with ``log.format = "json"`` stdout carries nothing but JSON objects."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx

from tests.helpers_process import serving, write_config


def test_admin_requests_are_logged_and_stdout_is_pure_json(tmp_path: Path) -> None:
    config = write_config(tmp_path / "gw.toml", tmp_path / "data")
    config.write_text(config.read_text() + '\n[log]\nformat = "json"\naccess_log = "-"\n')
    with serving(config) as proc:
        with proc.client() as admin:
            setup = admin.post("/setup", json={"name": "ops", "email": "ops@example.com"})
            assert setup.status_code == 201, setup.text
            token, admin_id = setup.json()["key"], setup.json()["id"]
            assert admin.get("/keys").status_code == 401
            listed = admin.get("/keys", headers={"authorization": f"Bearer {token}"})
            assert listed.status_code == 200
        assert httpx.get(f"{proc.proxy_url}/nowhere", timeout=10).status_code == 404
        assert proc.stop(signal.SIGTERM) == 0
        stdout, stderr = list(proc.stdout_lines), proc.stderr()

    lines = [json.loads(line) for line in stdout]  # every line is JSON
    assert all(isinstance(line, dict) for line in lines)
    assert any("admin listening on" in line.get("message", "") for line in lines)
    access = [line for line in lines if "status" in line]
    admin_lines = [line for line in access if line["route"] == "admin"]
    by_status = {(line["method"], line["path"], line["status"]): line for line in admin_lines}
    assert by_status[("POST", "/setup", 201)]["outcome"] == "ok"
    refused = by_status[("GET", "/keys", 401)]
    assert refused["outcome"] == "MISSING_KEY" and refused["key_id"] is None
    allowed = by_status[("GET", "/keys", 200)]
    assert allowed["key_id"] == admin_id and allowed["upstream"] is None
    assert allowed["duration_ms"] >= 0 and allowed["client_ip"] == "127.0.0.1"
    proxied = [line for line in access if line["path"] == "/nowhere"]
    assert proxied and proxied[0]["outcome"] == "ROUTE_NOT_FOUND"
    # The admin key is in no log.
    assert token not in "\n".join(stdout) and token not in stderr
