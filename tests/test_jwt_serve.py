"""The jwt plugin from a TOML config in a real ``triogate serve``: an HS256
secret from the environment (``secret_env``) and a JWKS from a threaded
server on 127.0.0.1, fetched by the plugin's background task, per-subject
limits, and a bad token among good ones."""

from __future__ import annotations

import http.server
import json
from pathlib import Path
from typing import Any, ClassVar

import httpx

from tests.helpers_jwt import HS_SECRET, jwk_of, make_token, rsa_key
from tests.helpers_process import serving, threaded_upstream, write_config


class _Jwks(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    body: ClassVar[bytes] = b""
    fetches: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).fetches.append(self.path)
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_jwt_in_triogate_serve(tmp_path: Path) -> None:
    _Jwks.body = json.dumps({"keys": [jwk_of(rsa_key(), "k1")]}).encode()
    with threaded_upstream() as upstream, threaded_upstream(_Jwks) as jwks:
        config = write_config(tmp_path / "triogate.toml", tmp_path / "data")
        with config.open("a") as f:
            f.write(
                f"""
[upstreams.app]
targets = ["{upstream}"]

[[routes]]
name = "app"
path = "/{{rest:path}}"
upstream = "app"

[routes.plugins.jwt]
keys = [{{ kid = "hs", algorithm = "HS256", secret_env = "TEST_JWT_SECRET" }}]
jwks = {{ url = "{jwks}/jwks.json", min_refresh_seconds = 0.1 }}

[routes.plugins.rate-limit]
limit = 1
period_seconds = 60
by = "consumer"
"""
            )
        with serving(config, env={"TEST_JWT_SECRET": HS_SECRET}) as sp:
            proxy = sp.proxy_url
            with httpx.Client(base_url=proxy, timeout=10) as client:

                def get(token: str) -> httpx.Response:
                    return client.get("/x", headers={"Authorization": f"Bearer {token}"})

                hs = make_token(HS_SECRET, "HS256", kid="hs", sub="alice")
                assert get(hs).status_code == 200
                rs = make_token(rsa_key(), "RS256", kid="k1", sub="bob")
                assert get(rs).status_code == 200, get(rs).text  # from the JWKS
                assert get(rs).status_code == 429  # bob's own limit
                assert get(hs).status_code == 429
                bad = get("not.a.token")
                assert bad.status_code == 401 and bad.json()["code"] == "INVALID_TOKEN"
                carol = make_token(HS_SECRET, "HS256", kid="hs", sub="carol")
                assert get(carol).status_code == 200
            assert _Jwks.fetches and all(p == "/jwks.json" for p in _Jwks.fetches)
            assert sp.stop() == 0
