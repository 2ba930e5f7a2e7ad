"""The key lookup cache (``control.keycache``): a hit is exactly what a fresh
lookup would read. Unit tests of the cache, then a real LMDB written by
another process (the CLI) while this one keeps answering from its cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import trio

from tests.conftest import make_secrets
from triogate.config import parse_config
from triogate.control.audit import Actor
from triogate.control.keycache import LookupCache
from triogate.control.keyformat import Keyspaces
from triogate.control.models import CreateKeyRequest, UpdateKeyRequest
from triogate.errors import KeyVerdict
from triogate.runtime.gateway import open_gateway
from triogate.storage import KeyRecord

ACTOR = Actor("adm_test", "127.0.0.1")


def record(key_id: str) -> KeyRecord:
    return KeyRecord(key_id, b"d", 1, "tg_x", "n", b"s", b"t", 1, (), "active", 0.0, 0.0)


SPACES = Keyspaces.single("tg_")


def test_a_hit_needs_the_same_generation_keyring_and_keyspaces() -> None:
    ring, other_ring = make_secrets().hmac, make_secrets().hmac
    cache = LookupCache()
    found = (record("key_a"), False)
    assert cache.get("tg_a", 1, ring, SPACES) is None
    cache.put("tg_a", found, 1, ring, SPACES)
    assert cache.get("tg_a", 1, ring, SPACES) is found
    assert cache.get("tg_b", 1, ring, SPACES) is None
    # Anything written (a new generation): everything goes.
    assert cache.get("tg_a", 2, ring, SPACES) is None
    assert len(cache) == 0
    cache.put("tg_a", found, 2, ring, SPACES)
    # A new keyring (secrets rotated, or reloaded from the file): the same.
    assert cache.get("tg_a", 2, other_ring, SPACES) is None
    assert len(cache) == 0
    cache.put("tg_a", found, 2, other_ring, SPACES)
    # Reloaded keyspaces (a prefix or an import format gone): the same.
    assert cache.get("tg_a", 2, other_ring, Keyspaces.single("tg_")) is None
    assert len(cache) == 0


def test_a_read_from_an_older_generation_is_not_kept() -> None:
    """put() with the generation read *before* the lookup: a write that
    landed meanwhile was seen by get() first, so the older read is dropped."""
    ring = make_secrets().hmac
    cache = LookupCache()
    assert cache.get("tg_a", 5, ring, SPACES) is None
    cache.put("tg_a", (record("key_a"), False), 4, ring, SPACES)
    assert len(cache) == 0
    assert cache.get("tg_a", 5, ring, SPACES) is None


def test_the_oldest_go_first_when_full() -> None:
    ring = make_secrets().hmac
    cache = LookupCache(size=3)
    cache.get("x", 1, ring, SPACES)
    for name in "abcd":
        cache.put(name, (record(f"key_{name}"), False), 1, ring, SPACES)
    assert len(cache) == 3
    assert cache.get("a", 1, ring, SPACES) is None
    for name in "bcd":
        hit = cache.get(name, 1, ring, SPACES)
        assert hit is not None and hit[0].id == f"key_{name}"


def _cli(*argv: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "triogate", *argv, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert isinstance(printed, dict)
    return printed


async def test_a_write_by_another_process_is_seen_on_the_next_lookup(tmp_path: Path) -> None:
    """Workers and the CLI write the same LMDB: a key this process validated
    (and cached) and another process revoked is refused on the next request."""
    data = tmp_path / "data"
    config = parse_config({"server": {"data_dir": str(data)}}, environ={})
    async with open_gateway(config) as gw:
        created = await gw.keys.create(
            msgspec.convert({"name": "svc", "owner": "o"}, CreateKeyRequest), ACTOR
        )
        cache = gw.keys._lookups
        for _ in range(3):
            record, verdict, _stale = gw.keys.validate_nowait(created.key)
            assert record is not None and verdict is None
        assert len(cache) == 1  # the second and third came from the cache
        revoked = await trio.to_thread.run_sync(
            lambda: _cli("keys", "revoke", created.id, "--data-dir", str(data))
        )
        assert revoked["id"] == created.id
        record, verdict, _stale = gw.keys.validate_nowait(created.key)
        assert record is not None and verdict is KeyVerdict.KEY_REVOKED


async def test_a_write_in_this_process_is_seen_on_the_next_lookup(tmp_path: Path) -> None:
    config = parse_config({"server": {"data_dir": str(tmp_path / "data")}}, environ={})
    async with open_gateway(config) as gw:
        created = await gw.keys.create(
            msgspec.convert({"name": "svc", "owner": "o", "scopes": ["a"]}, CreateKeyRequest),
            ACTOR,
        )
        assert gw.keys.validate_nowait(created.key, ["a"])[1] is None
        await gw.keys.update(
            created.id, msgspec.convert({"scopes": ["b"]}, UpdateKeyRequest), ACTOR
        )
        assert gw.keys.validate_nowait(created.key, ["a"])[1] is KeyVerdict.INSUFFICIENT_SCOPE
        await gw.keys.revoke(created.id, ACTOR)
        assert gw.keys.validate_nowait(created.key, ["b"])[1] is KeyVerdict.KEY_REVOKED
        # An unknown key is never kept: it costs a full lookup each time.
        unknown = gw.keys.format.generate()
        assert gw.keys.validate_nowait(unknown)[1] is KeyVerdict.INVALID_KEY
        assert unknown not in gw.keys._lookups._entries


async def test_a_keyspace_reloaded_away_refuses_its_cached_keys(tmp_path: Path) -> None:
    """A config reload that drops a key's prefix refuses the key on the next
    lookup, even with nothing written to the store in between."""
    config = parse_config({"server": {"data_dir": str(tmp_path / "data")}}, environ={})
    async with open_gateway(config) as gw:
        created = await gw.keys.create(
            msgspec.convert({"name": "svc", "owner": "o"}, CreateKeyRequest), ACTOR
        )
        assert gw.keys.validate_nowait(created.key)[1] is None
        assert gw.keys.validate_nowait(created.key)[1] is None  # a cache hit
        generation = gw.store.generation()
        gw.keys.format = Keyspaces.single("other_")  # what use_keyspaces does
        assert gw.keys.validate_nowait(created.key)[1] is KeyVerdict.INVALID_KEY
        assert gw.store.generation() == generation  # no write was needed
