"""Shared fixtures. Integration fixtures run the real server (``Server.run``,
hypercorn on an ephemeral loopback port) over a real LMDB in a temp dir."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from triogate.config import Config, parse_config
from triogate.control.crypto import HmacKeyring, Sealer, ServerSecrets
from triogate.runtime.gateway import Gateway
from triogate.runtime.native import REBUILD, native_status
from triogate.runtime.server import Server, ServerInfo
from triogate.storage import MemoryStore


def pytest_configure(config: pytest.Config) -> None:
    """Test the code as it is: never the old compiled build of an edited
    source, and never pure Python by accident (the product ships compiled;
    ``TRIOGATE_PURE=1`` at install and here tests the pure package)."""
    status = native_status()
    if status.stale:
        pytest.exit(f"compiled modules out of date: {', '.join(status.stale)}; {REBUILD}", 2)
    if not status.compiled and not os.environ.get("TRIOGATE_PURE"):
        pytest.exit(
            f"the data plane is not compiled (set TRIOGATE_PURE=1 to test pure Python); {REBUILD}",
            2,
        )


class FakeClock:
    """Wall-clock time that tests move by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_secrets(hmac_versions: int = 1) -> ServerSecrets:
    return ServerSecrets(
        HmacKeyring({v: os.urandom(32) for v in range(1, hmac_versions + 1)}),
        Sealer({1: os.urandom(32)}),
        "test",
    )


def make_config(data_dir: Path, **server: object) -> Config:
    raw = {
        "server": {
            "admin_listen": "127.0.0.1:0",
            "proxy_listen": "127.0.0.1:0",
            "data_dir": str(data_dir),
            "shutdown_grace_seconds": 2,
            **server,
        }
    }
    return parse_config(raw, environ={})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def memory_gateway(clock: FakeClock, tmp_path: Path) -> Gateway:
    """Services over the in-memory store and a hand-moved clock (unit tests)."""
    return Gateway(make_config(tmp_path), MemoryStore(), make_secrets(), clock=clock)


@dataclass
class Running:
    server: Server
    info: ServerInfo
    client: httpx.AsyncClient

    @property
    def gateway(self) -> Gateway:
        assert self.server.gateway is not None
        return self.server.gateway


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def running(data_dir: Path) -> AsyncIterator[Running]:
    """The real server in-process: hypercorn admin listener + LMDB."""
    server = Server(make_config(data_dir))
    async with trio.open_nursery() as nursery:
        info = await nursery.start(server.run)
        async with httpx.AsyncClient(base_url=info.admin_url, timeout=10) as client:
            yield Running(server, info, client)
        server.shutdown()


@dataclass
class Admin:
    id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture
async def root(running: Running) -> Admin:
    """The super_admin made by /setup."""
    r = await running.client.post("/setup", json={"name": "root", "email": "root@example.com"})
    assert r.status_code == 201, r.text
    body = r.json()
    return Admin(body["id"], body["key"])


@pytest.fixture
def no_env_secrets(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("TRIOGATE_HMAC_SECRET", raising=False)
    monkeypatch.delenv("TRIOGATE_ENCRYPTION_KEYS", raising=False)
    yield
